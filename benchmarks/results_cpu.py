"""The CPU protocol: every method on the same cached backbone features, MAP / precision@r2 / PR curves.

CIFAR-10 (paper split: 1,000 queries, 59,000 database, 5,000 training images),
EfficientNet-Lite0 ImageNet features at ``--image-size`` px computed once and
cached (``data.cache_features``), then

* classical baselines (LSH, PCAH, ITQ, SH) fit on the training features;
* deep methods: hash (+ classification) heads trained on the features through the
  same LightningModule and losses (DRH, DRH+, DSRH with bags s in {1, 10, 30},
  DPSH, DTSH, HashNet, CSQ, GreedyHash, OrthoHash, DSH, DHN), all with the same sampling, steps and batch size;

evaluated on the test queries against the database by ``metrics.retrieval_metrics``.
With ``--tuned`` (tune_cpu.py's JSON) each tuned method runs with the settings found on validation.
Each (method, bits, seed) result is appended to ``--results`` as one JSON line, so an
interrupted run resumes where it stopped; every run (``--report-only`` too) rewrites
docs/RESULTS.md's generated tables and plots from whatever has been measured (report_cpu.py).

    make bench-results    # the tuned protocol: --tuned benchmarks/results/tuned_cpu.json (resumes)
    make bench-report     # tables + plots from benchmarks/results/results_cpu_tuned.jsonl
    python -m benchmarks.results_cpu --seeds 0 1 2 --results runs/untuned.jsonl --docs runs/untuned_docs
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.report_cpu import write_report
from dsrh_lightning.baselines import build_baseline
from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.metrics import binarize, retrieval_metrics

REPO = Path(__file__).resolve().parents[1]

BASELINES = ["lsh", "pcah", "itq", "sh"]
# name -> (experiment config, extra overrides)
DEEP = {
    "DRH": ("drh", []),
    "DRH+": ("drh_plus", []),
    # untuned (no --tuned): the paper's constants, bags s = 30; --tuned sets every knob the recipe differs in
    "DSRH": ("dsrh_yao", []),
    "DSRH s=1": ("dsrh_yao", ["model.bag_size=1"]),
    "DSRH s=10": ("dsrh_yao", ["model.bag_size=10"]),
    "DPSH": ("dpsh", []),
    "DTSH": ("dtsh", []),
    "HashNet": ("hashnet", []),
    "CSQ": ("csq", []),
    "GreedyHash": ("greedyhash", []),
    "OrthoHash": ("orthohash", []),
    "DSH": ("dsh", []),
    "DHN": ("dhn", []),
}
# With --tuned: method -> (tuned method whose settings it takes, keys it drops). The ablations take DSRH's
# tuned recipe without the terms they ablate, so the comparison isolates the terms.
TUNED_FROM = {"DSRH": ("DSRH", []), "DRH+": ("DSRH", ["loss.cls_weight"]),
              "DRH": ("DSRH", ["loss.cls_weight", "loss.orth_weight"]),
              "HashNet": ("HashNet", []), "CSQ": ("CSQ", []), "GreedyHash": ("GreedyHash", []),
              "OrthoHash": ("OrthoHash", []), "DSH": ("DSH", []), "DHN": ("DHN", [])}
NAMES = {"lsh": "LSH", "pcah": "PCAH", "itq": "ITQ", "sh": "SH"}
ALL_METHODS = [NAMES[b] for b in BASELINES] + list(DEEP)


def base_overrides(args, bits: int, seed: int) -> list[str]:
    """The protocol's data and feature settings; callers append ``--override`` last, so it wins."""
    over = [
        f"dataset={args.dataset}", "model.backbone=" + args.backbone, "model.weights=" + args.weights,
        f"data.image_size={args.image_size}", "data.cache_features=true", f"data.feature_dir={args.feature_dir}",
        "data.num_workers=0", "data.download=false", f"model.bits={bits}", f"seed={seed}",
        f"data.protocol.seed={seed}", "trainer.accelerator=cpu",
        "trainer.progress_bar=false", "logger.name=none", "data.eval_batch_size=2000",
    ]
    if args.data_root:
        over.append(f"data.root={args.data_root}")
    if args.split_dir:
        over.append(f"data.split_dir={args.split_dir}")
    return over


def _features(dm: HashingDataModule, split: str):
    ds = getattr(dm, split)
    x = torch.from_numpy(np.stack([dm.train.images.features[dm.train.images.position[j]] for j in ds.indices]))
    return x, ds.labels[torch.as_tensor(ds.indices)]


# The shared cifar10.npz is sorted by class, so breaking Hamming ties by database index ("stable")
# ranks tied items in class order: a label leak that lifts MAP (constant codes score ~0.19, not ~0.10).
# "average" is the exact expectation over random orders inside each tie and cannot leak.
TIES = "average"


def evaluate_codes(q_codes, db_codes, q_labels, db_labels, pr: bool) -> dict:
    m = retrieval_metrics(q_codes, db_codes, q_labels, db_labels, radius=2, pr_curve=pr, ties=TIES)
    out = {"map": float(m["map"]), "precision_r2": float(m["precision_radius"]), "ties": TIES}
    if pr:
        out["pr_curve"] = {k: [float(v) for v in m["pr_curve"][k]] for k in ("radius", "precision", "recall")}
    return out


def baseline_codes(name: str, bits: int, seed: int, dm: HashingDataModule):
    """A classical baseline fit on the training features: query and database codes with their labels, and
    the fit's seconds."""
    xtr, _ = _features(dm, "train")
    xq, yq = _features(dm, "query")
    xdb, ydb = _features(dm, "database")
    t0 = time.perf_counter()
    model = build_baseline(name, bits, seed).fit(xtr.numpy())
    fit_s = time.perf_counter() - t0
    return model.encode(xq.numpy()), model.encode(xdb.numpy()), yq, ydb, fit_s


def checkpoint_codes(checkpoint, dm: HashingDataModule, threshold: float):
    """A trained head's query and database codes (with their labels) on the cached features."""
    from dsrh_lightning.runs.checkpoints import load_run

    module = load_run(checkpoint).module  # weights_only load, saved feature_dim
    with torch.no_grad():
        xq, yq = _features(dm, "query")
        xdb, ydb = _features(dm, "database")
        qc = binarize(module(xq), threshold)
        dbc = binarize(torch.cat([module(xdb[i:i + 8192]) for i in range(0, len(xdb), 8192)]), threshold)
    return qc, dbc, yq, ydb


def run_baseline(name: str, args, bits: int, seed: int, dm: HashingDataModule) -> dict:
    qc, dbc, yq, ydb, fit_s = baseline_codes(name, bits, seed, dm)
    res = evaluate_codes(qc, dbc, yq, ydb, pr=True)
    res["train_seconds"] = round(fit_s, 2)
    return res


def nearest_length(entries: dict, bits: int) -> dict:
    """The entry of ``entries`` (code length as a string -> entry) at the length nearest ``bits``, the shorter
    one on a tie."""
    return entries[min(entries, key=lambda b: (abs(int(b) - bits), int(b)))]


def tuned_overrides(tuned: dict, name: str, bits: int) -> list[str] | None:
    """The validation-tuned settings of ``name`` at the tuned code length nearest ``bits`` (None: untuned)."""
    source, drop = TUNED_FROM.get(name, (None, []))
    if not tuned or source not in tuned:
        return None
    over = nearest_length(tuned[source], bits)["overrides"]
    return [o for o in over if o.split("=", 1)[0] not in {"dataset", "experiment", *drop}]


def deep_overrides(name: str, args, bits: int, seed: int, tuned_settings: dict, output_dir: str) -> list[str]:
    """The config overrides of one deep run (pure: the recorded lr and settings are read from its config)."""
    exp, extra = DEEP[name]
    tuned = tuned_overrides(tuned_settings, name, bits)
    return base_overrides(args, bits, seed) + [
        f"experiment={exp}", f"output_dir={output_dir}", "name=run", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.val_every}", "trainer.test_after_fit=false",
        f"optim.lr_decay_steps={args.lr_decay_steps}", f"optim.lr={args.lr}", f"data.batch_size={args.batch_size}",
    ] + extra + (tuned or []) + list(args.override)  # --override last: it wins over the tuned settings


def run_deep(name: str, args, bits: int, seed: int, dm: HashingDataModule, tuned_settings: dict) -> dict:
    from dsrh_lightning.runs.train import train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(deep_overrides(name, args, bits, seed, tuned_settings, tmp))
        t0 = time.perf_counter()
        result = train(cfg)
        train_s = time.perf_counter() - t0
        qc, dbc, yq, ydb = checkpoint_codes(result["best_checkpoint"], dm, cfg.eval.threshold)
    res = evaluate_codes(qc, dbc, yq, ydb, pr=True)
    res.update(train_seconds=round(train_s, 1), best_val_map=result.get("best_val_map"),
               tuned=tuned_overrides(tuned_settings, name, bits), lr=float(cfg.optim.lr))
    return res


def load_results(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def repo_relative(path: Path) -> str:
    """``path`` relative to the repository when inside it (as the reports cite their source), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def machine() -> str:
    try:
        name = [l.split(":", 1)[1].strip() for l in subprocess.run(["lscpu"], capture_output=True, text=True).stdout
                .splitlines() if l.startswith("Model name")][0]
    except Exception:
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} cores"


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip()
    except Exception:
        return "unknown"


def add_data_args(p: argparse.ArgumentParser, image_size: int) -> None:
    """Where the images come from and the backbone that reads them (results_cpu, tune_cpu, finetune_cpu)."""
    p.add_argument("--dataset", default="cifar10")
    p.add_argument("--data-root", default=str(REPO.parent / "shared" / "data" / "cifar10"))
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default="imagenet")
    p.add_argument("--image-size", type=int, default=image_size)


def add_schedule_args(p: argparse.ArgumentParser) -> None:
    """Training length, validation interval and lr decay (the same in every CPU protocol)."""
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--lr-decay-steps", type=int, default=1000)


def add_report_args(p: argparse.ArgumentParser, results: str) -> None:
    """The results file (JSON lines, resumed) and the report written from it into --docs."""
    p.add_argument("--results", default=str(REPO / "benchmarks" / "results" / results))
    p.add_argument("--docs", default=str(REPO / "docs"))
    p.add_argument("--report-only", action="store_true")


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The protocol's arguments (shared with tune_cpu.py): data, features, training length and batch."""
    add_data_args(p, image_size=128)
    p.add_argument("--feature-dir", default=str(REPO / "data" / "features"))
    p.add_argument("--split-dir", default=str(REPO / "data" / "splits"))
    add_schedule_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="triplets (or images) per batch")
    p.add_argument("--lr", type=float, default=0.01, help="learning rate of untuned methods")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every deep run")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_args(p)
    p.add_argument("--bits", type=int, nargs="+", default=[12, 24, 32, 48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=ALL_METHODS, help=f"from {ALL_METHODS}")
    p.add_argument("--tuned", default="", help="tune_cpu.py's JSON: each tuned method runs with the settings "
                   "found on validation at the nearest tuned code length (its lr included)")
    add_report_args(p, "results_cpu.jsonl")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results_path = Path(args.results)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    tuned = json.loads(Path(args.tuned).read_text()) if args.tuned else {}
    if not args.report_only:
        unknown = set(args.methods) - set(ALL_METHODS)
        if unknown:
            p.error(f"unknown methods {sorted(unknown)}; choose from {ALL_METHODS}")
        torch.set_num_threads(args.threads)
        for seed in args.seeds:
            dm = None
            for bits in args.bits:
                for method in args.methods:
                    done = {(r["method"], r["bits"], r["seed"]) for r in load_results(results_path)}
                    if (method, bits, seed) in done:
                        continue
                    if dm is None:  # the features and split of this seed (split seed = seed)
                        dm = HashingDataModule(load_config(base_overrides(args, bits, seed) + list(args.override)),
                                               backbone_factory=build_backbone)
                        dm.setup("fit")
                    t0 = time.perf_counter()
                    if method in NAMES.values():
                        key = [k for k, v in NAMES.items() if v == method][0]
                        res = run_baseline(key, args, bits, seed, dm)
                    else:
                        res = run_deep(method, args, bits, seed, dm, tuned)
                    row = dict(method=method, bits=bits, seed=seed, steps=args.steps if method in DEEP else None,
                               batch_size=args.batch_size if method in DEEP else None, lr=res.pop("lr", None),
                               image_size=args.image_size, backbone=args.backbone,
                               seconds=round(time.perf_counter() - t0, 1), commit=git_commit(),
                               date=_dt.datetime.now().isoformat(timespec="seconds"), machine=machine(), **res)
                    if args.override:  # a probe's row says what it changed
                        row["override"] = list(args.override)
                    with results_path.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{method:10s} {bits:2d} bits seed {seed}: MAP {res['map']:.4f}  P@r2 "
                          f"{res['precision_r2']:.4f}  ({row['seconds']} s)", flush=True)
    write_report(load_results(results_path), Path(args.docs), args, order=ALL_METHODS, source=repo_relative(results_path),
                 tuned=tuned)


if __name__ == "__main__":
    main()
