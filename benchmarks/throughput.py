"""Training throughput against the model's own ceiling, fp32 vs bf16.

For each case ``backbone:image_size``:

(a) model only: random tensors already on the device, forward + backward + SGD step of the project's
    network (same batch) = the ceiling; FLOPs of one step from ``torch.utils.flop_counter`` and MFU
    against the device's peak (``--peak-tflops``, else a small table by device name; none on CPU);
(b) the project's real training loop: a Lightning ``Trainer`` over ``HashingDataModule`` +
    ``HashingModule`` (device-side augmentation by default, ``--augment-on worker`` for the former
    per-image path), timed from the first step after warm-up.

Reports images/s of both and their ratio. On CPU use small sizes to check the harness:

    python -m benchmarks.throughput --cases small_cnn:32 --batch 48 --steps 4 --warmup 1 \
        --dataset synthetic
    python -m benchmarks.throughput --cases vgg19:224 vgg19:32 efficientnet_lite0:224 \
        --batch 192 --steps 50 --precision fp32 bf16 --data-root ../shared/data/cifar10   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from dsrh_lightning.config import load_config, to_dict
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.lightning.module import HashingModule

# Dense peak TFLOP/s (no sparsity) by device-name substring: (fp32 non-tensor, bf16 tensor core).
PEAKS = {"H100": (67.0, 989.0), "H200": (67.0, 989.0), "A100": (19.5, 312.0)}
PRECISION = {"fp32": "32-true", "bf16": "bf16-mixed"}


def config(args, backbone: str, size: int, precision: str, out: str):
    weights = "none" if backbone == "small_cnn" else args.weights
    over = [f"dataset={args.dataset}", "experiment=dsrh_yao", f"model.backbone={backbone}", f"model.weights={weights}",
            f"data.image_size={size}", "data.sampling=triplets", f"data.batch_size={args.batch // 3}",
            f"data.num_workers={args.workers}", "data.download=false", f"data.augment_on={args.augment_on}",
            "model.bits=48", "logger.name=none", f"trainer.accelerator={args.accelerator}",
            f"trainer.precision={PRECISION[precision]}", "trainer.progress_bar=false", f"output_dir={out}"]
    if args.data_root and args.dataset != "synthetic":
        over.append(f"data.root={args.data_root}")
    return load_config(over + list(args.override))


def peak_flops(args, device: torch.device, precision: str):
    if args.peak_tflops:
        return args.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (fp32, bf16) in PEAKS.items():
        if key in name:
            return (bf16 if precision == "bf16" else fp32) * 1e12
    return None


def model_only(cfg, device: torch.device, precision: str, batch: int, steps: int, warmup: int):
    """(images/s, FLOPs per step) of forward + backward + SGD on random device tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    module = HashingModule(to_dict(cfg), num_classes=10).to(device).train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)
    size = cfg.data.image_size
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        with autocast:
            out = module.net(x)
            loss = out["codes"].float().square().mean()
            if out.get("logits") is not None:
                loss = loss + F.cross_entropy(out["logits"].float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(warmup):
        step()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - t0), flops


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.t0, self.t1, self.steps = warmup, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            if trainer.strategy.root_device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.strategy.root_device.type == "cuda":
            torch.cuda.synchronize()
        self.t1 = time.perf_counter()
        self.steps = trainer.global_step - self.warmup


def real_loop(cfg, steps: int, warmup: int) -> float:
    """images/s of the project's training loop (data module + module + Trainer), after warm-up."""
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    torch.manual_seed(0)
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes)
    timer = _StepTimer(warmup)
    t = cfg.trainer
    trainer = pl.Trainer(max_steps=steps + warmup, accelerator=t.accelerator, devices=1, precision=t.precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer],
                         use_distributed_sampler=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    return 3 * cfg.data.batch_size * timer.steps / (timer.t1 - timer.t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=None,
                    help="backbone:size ... (default: vgg19:224 vgg19:32 efficientnet_lite0:224 on a GPU; on a CPU "
                         "small_cnn:32 with --steps 20 --warmup 3 --precision fp32 unless given, to prove the harness)")
    ap.add_argument("--batch", type=int, default=192, help="images per step (a multiple of 3: triplets)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 50 on a GPU, 20 on a CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5 on a GPU, 3 on a CPU)")
    ap.add_argument("--precision", nargs="+", default=None, choices=sorted(PRECISION),
                    help="default fp32 bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--accelerator", default="auto")
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-root", default="")
    ap.add_argument("--weights", default="none", help="backbone weights for the timed network (none: no download)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--augment-on", default="device", choices=["device", "worker"])
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (default: table by name)")
    ap.add_argument("--skip-loop", action="store_true", help="model-only ceiling only")
    ap.add_argument("--override", nargs="*", default=[])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.batch % 3:
        ap.error("--batch must be a multiple of 3 (explicit triplets)")
    if args.accelerator == "auto":
        args.accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    device = torch.device("cuda" if args.accelerator == "gpu" else "cpu")
    gpu = device.type == "cuda"
    # The real measurement is on a GPU; a CPU run only proves the harness at a size that ends in minutes.
    args.cases = args.cases or (["vgg19:224", "vgg19:32", "efficientnet_lite0:224"] if gpu else ["small_cnn:32"])
    args.steps = args.steps if args.steps is not None else (50 if gpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (5 if gpu else 3)
    args.precision = args.precision or (["fp32", "bf16"] if gpu else ["fp32"])
    rows = []
    for case in args.cases:
        backbone, size = case.split(":")
        for precision in args.precision:
            with tempfile.TemporaryDirectory() as tmp:
                cfg = config(args, backbone, int(size), precision, tmp)
                ceiling, flops = model_only(cfg, device, precision, args.batch, args.steps, args.warmup)
                peak = peak_flops(args, device, precision)
                achieved = flops * ceiling / args.batch
                row = {"case": case, "precision": precision, "batch": args.batch,
                       "model_images_per_s": round(ceiling, 1), "gflops_per_step": round(flops / 1e9, 2),
                       "mfu": round(achieved / peak, 4) if peak else None}
                if not args.skip_loop:
                    loop = real_loop(cfg, args.steps, args.warmup)
                    row.update(loop_images_per_s=round(loop, 1), loop_over_model=round(loop / ceiling, 3),
                               augment_on=args.augment_on)
                rows.append(row)
                print(json.dumps(row), flush=True)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": device_name, "torch_threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
