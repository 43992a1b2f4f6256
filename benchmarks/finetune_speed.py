"""Partial fine-tuning speed: time per training step of the project's loop against a plain PyTorch loop,
and (``--protocol``) the CPU protocol's fine-tune end to end with the partial setting and its MAP.

Step mode (default). One configuration (``model.train_blocks``, ``data.cache_features``, backbone, image
size, bits) is set up once through the real data module (so a partial run extracts or reads its cache of
lower-block outputs first, outside the timing). Then, in alternating rounds (a change of machine load
hits both alike):

* ``lightning``: the project's Trainer (``runs.train.build_trainer``: its precision, plugins, logging
  interval) fitting ``HashingModule`` on the data module's training loader;
* ``plain``: a Python loop over the same kind of loader, calling the same ``training_step`` (same network,
  same losses), then ``zero_grad`` / ``backward`` / ``step`` of an SGD optimiser over the same parameters.

Each round times ``--steps`` steps after ``--warmup`` steps, as the interval between consecutive batch
ends (data loading included); the median step of each loop and their ratio (goal: <= 1.3) are printed
and, with ``--results``, appended as a JSON line. ``--accelerator gpu`` runs both loops on a GPU (each
step's end waits for the GPU), ``--precision bf16-mixed`` both in bf16 autocast.

Protocol mode (``--protocol``): benchmarks/finetune_cpu.py's run (CIFAR-10, the paper protocol,
``dsrh train`` with validation-based model selection) with ``data.cache_features=true
model.train_blocks=N``, for ``--methods`` / ``--bits`` / ``--seeds``; one JSON line per run with its
test MAP and wall-clock seconds (extraction of the cache included on the first run).

    python -m benchmarks.finetune_speed                          # tiny: small_cnn on synthetic data
    python -m benchmarks.finetune_speed --backbone efficientnet_lite0 --weights imagenet --dataset cifar10 \\
        --image-size 96 --train-blocks 2 --bits 48                # time per step, EfficientNet-Lite0 at 96 px
    python -m benchmarks.finetune_speed --protocol --backbone efficientnet_lite0 --weights imagenet \\
        --dataset cifar10 --image-size 96 --train-blocks 2 --bits 48 --results benchmarks/results/finetune_speed.jsonl
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]


def step_overrides(args) -> List[str]:
    """The config of the step-time comparison (pure: tested)."""
    over = [f"dataset={args.dataset}", f"experiment={args.experiment}", f"model.backbone={args.backbone}",
            f"model.weights={args.weights}", f"model.bits={args.bits[0]}", f"model.train_blocks={args.train_blocks}",
            f"data.cache_features={str(args.cache).lower()}", f"data.feature_dir={args.feature_dir}",
            f"data.image_size={args.image_size}", f"data.batch_size={args.batch_size}", "data.sampling=balanced",
            f"data.images_per_class={args.images_per_class}", "data.num_workers=0", "data.download=false",
            "logger.name=none", "trainer.progress_bar=false", f"trainer.accelerator={args.accelerator}", "trainer.devices=1",
            f"trainer.precision={args.precision}", f"trainer.num_threads={args.threads}",
            # no validation inside the timed fit (only Lightning's one-batch sanity check before it)
            f"trainer.max_steps={args.warmup + args.steps}", "trainer.val_check_interval=1000000",
            "trainer.test_after_fit=false"]
    if args.data_root and args.dataset != "synthetic":
        over.append(f"data.root={args.data_root}")
    if args.dataset == "synthetic":
        over += ["data.synthetic_per_class=40", "data.protocol.query_per_class=5", "data.protocol.train_per_class=20",
                 "data.protocol.val_per_class=5"]
    return over + list(args.override)


def _sync(accelerator: str) -> None:
    """Wait for the GPU's queued work, so a step's end time is when it finished."""
    if accelerator == "gpu":
        import torch

        torch.cuda.synchronize()


def _median_step(ends: List[float], warmup: int) -> float:
    """Median interval between consecutive batch ends after ``warmup`` steps, in seconds."""
    gaps = [b - a for a, b in zip(ends[warmup:], ends[warmup + 1:])]
    if not gaps:
        raise ValueError("no timed steps: raise --steps")
    return statistics.median(gaps)


def lightning_round(cfg, dm, run_dir: Path) -> List[float]:
    """Batch-end times of one fit through the project's Trainer."""
    import pytorch_lightning as pl
    import torch

    from dsrh_lightning.config import to_dict
    from dsrh_lightning.lightning.module import HashingModule
    from dsrh_lightning.runs.train import build_trainer

    ends: List[float] = []

    class Clock(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            _sync(str(cfg.trainer.accelerator))
            ends.append(time.perf_counter())

    torch.manual_seed(int(cfg.seed))
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes, multilabel=dm.multilabel,
                           feature_dim=dm.feature_dim, feature_stats=dm.feature_stats)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = build_trainer(cfg, run_dir, None, [Clock()])
        trainer.fit(module, datamodule=dm)
    return ends


def plain_round(cfg, dm, steps: int) -> List[float]:
    """Batch-end times of a plain PyTorch loop: the same module's training_step, SGD, the same loader, on
    the same device and precision (bf16 autocast for ``bf16-mixed``)."""
    import contextlib

    import torch
    from lightning_fabric.utilities.apply_func import move_data_to_device

    from dsrh_lightning.config import to_dict
    from dsrh_lightning.lightning.module import HashingModule

    torch.manual_seed(int(cfg.seed))
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes, multilabel=dm.multilabel,
                           feature_dim=dm.feature_dim, feature_stats=dm.feature_stats)
    accelerator = str(cfg.trainer.accelerator)
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    module.to(device).train()
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if str(cfg.trainer.precision) == "bf16-mixed"
                else contextlib.nullcontext())
    o = cfg.optim
    opt = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=o.lr, momentum=o.momentum,
                          weight_decay=o.weight_decay)
    dm.trainer = None  # a previous round's Trainer would set where the loader resumes
    dm.set_epoch(0)
    loader = dm.train_dataloader()
    ends: List[float] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log outside a Trainer
        while len(ends) < steps:
            for i, batch in enumerate(loader):
                batch = move_data_to_device(batch, device)
                batch = dm.on_after_batch_transfer(batch, 0)  # uint8 images -> augmented floats, as Lightning does
                with autocast:
                    loss = module.training_step(batch, i)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                _sync(accelerator)
                ends.append(time.perf_counter())
                if len(ends) >= steps:
                    break
    return ends


def step_mode(args) -> Dict:
    from dsrh_lightning.config import load_config
    from dsrh_lightning.data.datamodule import HashingDataModule
    from dsrh_lightning.lightning.resources import resolve_trainer
    from dsrh_lightning.models import build_backbone

    cfg = load_config(step_overrides(args))
    resolve_trainer(cfg)  # threads and precision as a run uses them
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    t0 = time.perf_counter()
    dm.setup("fit")  # extracts (or reads) the cache outside the timing
    setup_s = time.perf_counter() - t0
    total = args.warmup + args.steps
    times = {"lightning": [], "plain": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            times["plain"].append(_median_step(plain_round(cfg, dm, total), args.warmup))
            times["lightning"].append(_median_step(lightning_round(cfg, dm, Path(tmp) / f"r{r}"), args.warmup))
    lit, plain = statistics.median(times["lightning"]), statistics.median(times["plain"])
    row = dict(mode="step", backbone=args.backbone, weights=args.weights, dataset=args.dataset,
               image_size=args.image_size, bits=args.bits[0], train_blocks=args.train_blocks, cache_features=args.cache,
               batch_size=args.batch_size, precision=str(cfg.trainer.precision), threads=int(cfg.trainer.num_threads),
               accelerator=args.accelerator,
               steps=args.steps, rounds=args.rounds, lightning_step_ms=round(lit * 1e3, 2),
               plain_step_ms=round(plain * 1e3, 2), ratio=round(lit / plain, 3),
               rounds_ms={k: [round(v * 1e3, 2) for v in vs] for k, vs in times.items()},
               setup_seconds=round(setup_s, 1))
    print(f"{args.backbone} {args.image_size}px train_blocks={args.train_blocks} cache={args.cache}: "
          f"project loop {lit * 1e3:.1f} ms/step, plain loop {plain * 1e3:.1f} ms/step, ratio {lit / plain:.2f} "
          f"(goal <= 1.3)", flush=True)
    return row


def protocol_mode(args) -> List[Dict]:
    from benchmarks.finetune_cpu import run_one

    # finetune_cpu.run_overrides reads args.train_blocks / args.feature_dir (cached lower blocks, top N train);
    # its run names carry N, so a run never resumes (resume=auto) one of another split point.
    tuned = json.loads(Path(args.tuned).read_text()) if args.tuned else {}
    rows = []
    for seed in args.seeds:
        for bits in args.bits:
            for method in args.methods:
                row = run_one(args, method, bits, seed, tuned)
                row.update(mode="protocol", train_blocks=args.train_blocks, cache_features=True)
                print(f"{method} {bits} bits seed {seed}, {args.image_size}px train_blocks={args.train_blocks}: "
                      f"test MAP {row['map']:.4f} in {row['seconds'] / 60:.1f} min", flush=True)
                rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    from benchmarks.finetune_cpu import METHODS
    from benchmarks.results_cpu import add_data_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--protocol", action="store_true", help="run the CPU protocol's fine-tune and report MAP")
    add_data_args(p, image_size=32)
    p.set_defaults(dataset="synthetic", backbone="small_cnn", weights="none")
    p.add_argument("--train-blocks", type=int, default=2, help="model.train_blocks: the last N blocks train")
    p.add_argument("--no-cache", dest="cache", action="store_false",
                   help="train on images (frozen lower blocks computed every step) instead of their cache")
    p.add_argument("--feature-dir", default=str(REPO / "data" / "features"))
    p.add_argument("--bits", type=int, nargs="+", default=[48])
    p.add_argument("--experiment", default="dsrh", help="step mode: the experiment config")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--images-per-class", type=int, default=8)
    p.add_argument("--precision", default="32-true", help="32-true or bf16-mixed (both loops)")
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"], help="step mode: where both loops run")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: as a run chooses)")
    p.add_argument("--warmup", type=int, default=3, help="step mode: untimed steps per round")
    p.add_argument("--steps", type=int, default=None,
                   help="step mode: timed steps per round (default 10); protocol: training steps (default 1500)")
    p.add_argument("--rounds", type=int, default=3, help="step mode: alternating rounds of both loops")
    # protocol mode (benchmarks/finetune_cpu.py's arguments)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--lr-decay-steps", type=int, default=1000)
    p.add_argument("--methods", nargs="+", default=["DSRH"], choices=list(METHODS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--split-dir", default=str(REPO / "data" / "splits"))
    p.add_argument("--sampling", default="balanced")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--backbone-lr-mult", type=float, default=1.0)
    p.add_argument("--tuned", default=str(REPO / "benchmarks" / "results" / "finetune_cpu_recipe.json"),
                   help="protocol: the recipe file make bench-finetune uses ('' = the experiment config as it is)")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "finetune_speed"))
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides")
    p.add_argument("--results", default="", help="append each row as a JSON line to this file")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 1500 if args.protocol else 10
    return args


def main(argv=None) -> None:
    from benchmarks.results_cpu import git_commit, machine

    args = parse_args(argv)
    rows = protocol_mode(args) if args.protocol else [step_mode(args)]
    if args.results:
        path = Path(args.results)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for row in rows:
                row.setdefault("commit", git_commit())
                row.setdefault("machine", machine())
                row.setdefault("date", _dt.datetime.now().isoformat(timespec="seconds"))
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
