"""What the code-length-dependent scales do at 12 and 48 bits.

Two terms of the DSRH objective scale with the code length k: the triplet hinge's
squared distances between codes in [0,1]^k (so a fixed margin of 1 is a different
demand at 12 and at 48 bits) and the orthogonality penalty ||(1/m) H~^T H~ - I||_F^2,
which has k^2 entries (about k when the codes sit near 0.5, as at initialisation).
For each setting this script records the size of every loss term at initialisation
(one training batch, untrained heads) and the test MAP after training, at 12 and 48
bits, on the CPU protocol's cached CIFAR-10 features (see docs/RESULTS.md).

    python -m benchmarks.code_length_scales --seeds 0 1      # make bench-scales
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from dsrh_lightning.config import load_config, to_dict
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.losses import effective_margin
from dsrh_lightning.lightning.module import HashingModule, combine_losses
from dsrh_lightning.runs.train import train

REPO = Path(__file__).resolve().parents[1]

# name -> overrides (on top of experiment=dsrh_yao, the paper's constants: triplet + 0.25 * orthogonality
# + classification)
SETTINGS = {
    "paper: margin 1, orth unnormalised": [],
    "orth / k": ["loss.orth_norm=bits"],
    "orth / k^2": ["loss.orth_norm=bits2"],
    "no orth (lambda 0)": ["loss.orth_weight=0"],
    "margin k/12 (per_bit 1/12)": ["loss.margin_scaling=per_bit", f"loss.margin={1 / 12}"],
}


def overrides(args, bits: int, seed: int, extra, tmp: str) -> list[str]:
    over = [
        "dataset=cifar10", "experiment=dsrh_yao", f"data.root={args.data_root}", "data.download=false",
        "model.backbone=efficientnet_lite0", "model.weights=imagenet", f"data.image_size={args.image_size}",
        "data.cache_features=true", f"data.feature_dir={args.feature_dir}", "data.num_workers=0",
        f"model.bits={bits}", f"seed={seed}", f"data.protocol.seed={seed}", "trainer.accelerator=cpu",
        "trainer.progress_bar=false", "logger.name=none", "data.eval_batch_size=2000",
        f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.steps}",
        f"optim.lr_decay_steps={int(args.steps * 2 / 3)}", "data.batch_size=32",
        f"output_dir={tmp}", "name=run",
    ]
    return over + list(extra)


def initial_terms(cfg) -> dict:
    """Every weighted loss term on the first training batch, before any update."""
    torch.manual_seed(cfg.seed)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    module = HashingModule(to_dict(cfg), dm.num_classes, feature_dim=dm.feature_dim).eval()
    images, labels = next(iter(dm.train_dataloader()))[:2]
    with torch.no_grad():
        out = module.net(images.flatten(0, 1))
        r = module.ranking_terms(out, labels.flatten(0, 1), step=0)
        ranking, orth, codes, flat = r.loss, r.orth, r.codes, r.labels
        terms = combine_losses(ranking, orth, codes, out["logits"], flat, cfg.loss)
    lc = cfg.loss
    return {
        "margin": effective_margin(lc.margin, cfg.model.bits, lc.margin_scaling),
        "ranking": float(lc.ranking_weight * terms["ranking"]),
        "orth": float(lc.orth_weight * terms.get("orth", torch.tensor(0.0))),
        "cls": float(lc.cls_weight * terms.get("cls", torch.tensor(0.0))),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--feature-dir", default=str(REPO / "data" / "features"))
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "code_length_scales.jsonl"))
    args = p.parse_args()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["setting"], r["bits"], r["seed"]) for r in map(json.loads, out.read_text().splitlines())} \
        if out.is_file() else set()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=REPO).stdout.strip()
    for seed in args.seeds:
        for bits in (12, 48):
            for name, extra in SETTINGS.items():
                if (name, bits, seed) in done:
                    continue
                with tempfile.TemporaryDirectory() as tmp:
                    cfg = load_config(overrides(args, bits, seed, extra, tmp))
                    init = initial_terms(cfg)
                    res = train(cfg)
                row = {"setting": name, "bits": bits, "seed": seed, "init": init,
                       "test_map": res["test/map"], "test_precision_r2": res["test/precision_radius"],
                       "commit": commit, "date": _dt.datetime.now().isoformat(timespec="seconds")}
                with out.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(json.dumps(row), flush=True)
    report(out)
    return 0


def report(path: Path) -> None:
    rows = [json.loads(l) for l in path.read_text().splitlines() if l.strip()]
    print("\n| setting | bits | margin | init ranking | init lambda*orth | init cls | test MAP | prec@r2 | n |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in SETTINGS:
        for bits in (12, 48):
            sel = [r for r in rows if r["setting"] == name and r["bits"] == bits]
            if not sel:
                continue
            m = np.array([r["test_map"] for r in sel])
            pr = np.array([r["test_precision_r2"] for r in sel])
            init = {k: np.mean([r["init"][k] for r in sel]) for k in ("margin", "ranking", "orth", "cls")}
            print(f"| {name} | {bits} | {init['margin']:.2f} | {init['ranking']:.3f} | {init['orth']:.3f} | "
                  f"{init['cls']:.3f} | {m.mean():.4f} ± {m.std():.4f} | {pr.mean():.4f} ± {pr.std():.4f} | "
                  f"{len(sel)} |")


if __name__ == "__main__":
    sys.exit(main())
