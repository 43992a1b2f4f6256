"""Training throughput on CPU: explicit triplets vs in-batch mining, same backbone, one run.

For each backbone, both modes run the real data module (transforms, sampling) and
``HashingModule.training_step`` + SGD step in a plain loop (no Trainer, so no
logging/validation overhead), timed after warm-up steps. Reported:

* images/s: images forwarded and back-propagated per second;
* triplets/s: ranking triplets the loss sees per second (explicit: one per
  3 images; in-batch: every valid (anchor, positive, negative) of the batch).

Both modes forward the same number of images per step (3 x triplets per batch). The two
modes are timed in alternating rounds and the median round is reported, so a change of
machine load during the run hits both alike.

    python -m benchmarks.train_speed [--cases small_cnn:32:96:8 efficientnet_lite0:64:48:3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from dsrh_lightning.config import load_config, to_dict
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.losses.miners import mine_all_triplets
from dsrh_lightning.models import build_backbone
from dsrh_lightning.lightning.module import HashingModule

REPO = Path(__file__).resolve().parents[1]


def setup(backbone: str, size: int, images_per_step: int, sampling: str, args):
    """(module, optimiser, endless batch iterator, images_per_class) for one mode."""
    weights = "none" if backbone == "small_cnn" else "imagenet"
    # Balanced batches of P classes x K images (CIFAR-10 has 10 classes).
    per_class = 12 if images_per_step % 12 == 0 and images_per_step // 12 <= 10 else 8
    over = [f"dataset={args.dataset}", "experiment=dsrh_yao", f"model.backbone={backbone}", f"model.weights={weights}",
            f"data.image_size={size}", f"data.sampling={sampling}", "data.num_workers=0", "data.download=false",
            "model.bits=48", "logger.name=none", "trainer.accelerator=cpu", f"data.images_per_class={per_class}",
            f"data.batch_size={images_per_step // 3 if sampling == 'triplets' else images_per_step}"]
    if args.data_root:
        over.append(f"data.root={args.data_root}")
    cfg = load_config(over)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    torch.manual_seed(0)
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes)
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=1e-3, momentum=0.9)

    def batches():
        while True:
            # data.augment_on=device: the uint8 batch is finished as Lightning would after transfer.
            yield from (dm.on_after_batch_transfer(b, 0) for b in dm.train_dataloader())

    return module, opt, batches(), per_class


def timed_steps(module, opt, batches, steps: int, sampling: str) -> tuple[float, int, int]:
    """Seconds, images and ranking triplets of ``steps`` training steps (data loading included)."""
    images = triplets = 0
    t0 = time.perf_counter()
    for i in range(steps):
        batch = next(batches)
        loss = module.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sampling == "triplets":
            images += batch[0].shape[0] * 3
            triplets += batch[0].shape[0]
        else:
            images += batch[0].shape[0]
            triplets += len(mine_all_triplets(batch[1])[0])
    return time.perf_counter() - t0, images, triplets


def measure_case(backbone: str, size: int, images_per_step: int, steps: int, args) -> list[dict]:
    """Both modes, measured in alternating rounds (so both see the same load drift); median per mode."""
    modes = {m: setup(backbone, size, images_per_step, m, args) for m in ("triplets", "balanced")}
    for m, (module, opt, it, _) in modes.items():
        timed_steps(module, opt, it, args.warmup, m)
    rounds = {m: [] for m in modes}
    for _ in range(args.rounds):
        for m, (module, opt, it, _) in modes.items():
            rounds[m].append(timed_steps(module, opt, it, steps, m))
    rows = []
    for m, res in rounds.items():
        ips = sorted(i / s for s, i, _ in res)
        tps = sorted(t / s for s, _, t in res)
        rows.append({"backbone": backbone, "image_size": size, "sampling": m, "images_per_step": images_per_step,
                     "steps_per_round": steps, "rounds": args.rounds,
                     "images_per_s": round(float(np.median(ips)), 1),
                     "images_per_s_rounds": [round(x, 1) for x in ips],
                     "triplets_per_s": round(float(np.median(tps)), 1),
                     "triplets_per_step": res[0][2] // steps,
                     "images_per_class": modes[m][3] if m == "balanced" else None})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--cases", nargs="+", default=["small_cnn:32:96:8", "efficientnet_lite0:64:48:3"],
                   help="backbone:image_size:images_per_step:timed_steps")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per mode (median reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_speed.json"))
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    rows = []
    for case in args.cases:
        backbone, size, per_step, steps = case.split(":")
        for row in measure_case(backbone, int(size), int(per_step), int(steps), args):
            rows.append(row)
            print(json.dumps(row), flush=True)
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((l.split(":", 1)[1].strip() for l in lscpu.splitlines() if l.startswith("Model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    meta = {"machine": f"{cpu}, {os.cpu_count()} cores", "threads": args.threads, "commit": commit,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
            "load_average_at_end": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print("| backbone | px | sampling | images/step | triplets/step | images/s (median) | rounds | triplets/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        mode = ("explicit triplets" if r["sampling"] == "triplets" else
                f"in-batch mining ({r['images_per_step'] // r['images_per_class']} classes x {r['images_per_class']})")
        print(f"| {r['backbone']} | {r['image_size']} | {mode} | {r['images_per_step']} | {r['triplets_per_step']} | "
              f"{r['images_per_s']} | {r['images_per_s_rounds']} | {r['triplets_per_s']} |")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
