"""Head training speed on cached features: a DSRH head run at 48 bits through the project's
real ``train()`` (Lightning, the data module, the module, validation at the end), on CIFAR-10 features of a
frozen EfficientNet-Lite0 (ImageNet weights) at 128 px extracted once by ``data.cache_features``.

Prints the wall time of ``train()`` (feature extraction excluded: the cache is filled first, untimed),
steps/s, the final validation MAP and the torch thread count. Run it with nothing else on the machine.

    python -m benchmarks.head_speed [--steps 2400] [--image-size 128] [--bits 48]
    python -m benchmarks.head_speed --dataset synthetic --backbone small_cnn --weights none \
        --steps 20          # a seconds-long check of the harness
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.runs.train import train

REPO = Path(__file__).resolve().parents[1]


def overrides(args, out_dir: str) -> list[str]:
    over = [
        f"dataset={args.dataset}", f"experiment={args.experiment}", f"model.backbone={args.backbone}",
        f"model.weights={args.weights}", f"data.image_size={args.image_size}", "data.cache_features=true",
        f"data.feature_dir={args.feature_dir}", "data.num_workers=0", "data.download=false",
        f"model.bits={args.bits}", f"seed={args.seed}", "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.progress_bar=false", "logger.name=none", "data.eval_batch_size=2000",
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        "trainer.checkpoint_every_n_steps=0", "trainer.test_after_fit=false",
        f"trainer.log_every_n_steps={args.log_every}", f"output_dir={out_dir}", "name=head_speed",
    ]
    if args.data_root:
        over.append(f"data.root={args.data_root}")
    return over + list(args.override)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2400)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--experiment", default="dsrh_yao",
                    help="experiment config: dsrh_yao (the paper's constants), dsrh_tuned (the frozen-feature "
                         "recipe) or dsrh (the end-to-end recipe)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10")
                    if (REPO.parent / "shared" / "data" / "cifar10").is_dir() else "/work/shared/data/cifar10")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default="imagenet")
    ap.add_argument("--feature-dir", default=str(REPO / "data" / "features"))
    ap.add_argument("--log-every", type=int, default=50, help="trainer.log_every_n_steps")
    ap.add_argument("--override", nargs="*", default=[], help="extra config overrides (key=value)")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args(argv)
    if args.dataset == "synthetic":
        args.data_root = ""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(overrides(args, tmp))
        t0 = time.perf_counter()
        dm = HashingDataModule(cfg, backbone_factory=build_backbone)
        dm.setup("fit")  # fills the feature cache (once); not part of the timed run
        extract_s = time.perf_counter() - t0
        print(f"features: {dm.feature_cache} ({dm.feature_dim}-d; setup {extract_s:.1f} s)", flush=True)
        t0 = time.perf_counter()
        results = train(cfg)
        wall = time.perf_counter() - t0
    steps = int(results["global_step"])
    out = {"steps": steps, "wall_s": round(wall, 2), "steps_per_s": round(steps / wall, 2),
           "val_map": results.get("val/map"), "experiment": args.experiment, "bits": args.bits,
           "image_size": args.image_size, "backbone": args.backbone, "dataset": args.dataset,
           "torch_threads": torch.get_num_threads()}
    print(json.dumps(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
