"""End-to-end fine-tuning on CPU: every method with a trainable backbone, the classification stream (DSRH)
able to shape the features the hash stream reads.

EfficientNet-Lite0 (ImageNet weights) at ``--image-size`` px (default 96) on CIFAR-10's paper protocol (1,000
test queries ranked against the whole 59,000-image database). By default the top ``--train-blocks`` blocks
(3: stage 6, stage 7 and the 1x1-conv head) train with the heads on a cache of the frozen lower blocks'
outputs (``model.train_blocks``, ``data.cache_features``), a step costing only the top of the network;
``--train-blocks -1`` trains every layer on augmented images. Each run goes through ``dsrh train`` (the
project's Trainer, checkpoints, validation-based model selection); the test metrics are those of the best
validation checkpoint.

Methods share everything but their losses: DSRH's recipe (``--tuned``: finetune_cpu_recipe.json) without the
orthogonality term (DRH) or the classification term (DRH and DRH+); HashNet and CSQ take their entries of
``--tuned`` when it has them, the other peers (DPSH, DTSH, GreedyHash, OrthoHash, DSH, DHN) their experiment
configs. The recipe's learning rate is not used: every run takes ``--lr`` for the heads and
``--lr * --backbone-lr-mult`` for the backbone.

Each (method, bits, seed) is appended to ``--results`` as one JSON line; runs keep their folders under
``--output-dir`` and an interrupted run continues from its last.ckpt (``resume=auto``) when the
command is run again. Every run (``--report-only`` too) rewrites the fine-tune block of docs/RESULTS.md from
``--results`` and the files named by ``--also-report``: a mean ± sd table per method and protocol.

    python -m benchmarks.finetune_cpu --override data.cache_flip=true    # DRH, DRH+, DSRH at 48 bits, seed 0
    python -m benchmarks.finetune_cpu --methods DSRH HashNet --bits 12 48 --seeds 0 1 2 --override data.cache_flip=true
    python -m benchmarks.finetune_cpu --report-only
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import statistics
import time
from pathlib import Path
from typing import Dict, List

from benchmarks.report_cpu import replace_block
from benchmarks.results_cpu import (add_data_args, add_report_args, add_schedule_args, git_commit, load_results,
                         machine, nearest_length, repo_relative, tuned_overrides)

REPO = Path(__file__).resolve().parents[1]

# method -> experiment config. The ablations take DSRH's tuned settings without the ablated terms; the
# peers (not run by default) their own tuned settings, each without its heads' lr.
METHODS = {"DRH": "drh", "DRH+": "drh_plus", "DSRH": "dsrh", "DSRH (paper)": "dsrh_yao", "DPSH": "dpsh", "DTSH": "dtsh", "HashNet": "hashnet",
           "CSQ": "csq", "GreedyHash": "greedyhash", "OrthoHash": "orthohash", "DSH": "dsh", "DHN": "dhn"}
ABLATIONS = ["DRH", "DRH+", "DSRH"]
BEGIN, END = "<!-- BEGIN GENERATED finetune (benchmarks/finetune_cpu.py) -->", "<!-- END GENERATED finetune -->"


def end_to_end_settings(tuned: dict, method: str, bits: int) -> List[str]:
    """``method``'s own entry of ``tuned`` when an end-to-end search made it (``tune_cpu.py --protocol finetune``:
    ``"protocol": "finetune"``) at the tuned length nearest ``bits``: its overrides but the config groups (its lr,
    backbone lr multiplier, dropout and loss knobs); empty otherwise."""
    entries = (tuned or {}).get(method, {})
    if not entries:
        return []
    nearest = nearest_length(entries, bits)
    if nearest.get("protocol") != "finetune":
        return []
    return [o for o in nearest["overrides"] if o.split("=", 1)[0] not in ("dataset", "experiment")]


def run_overrides(args, method: str, bits: int, seed: int, tuned: dict) -> List[str]:
    """The ``dsrh train`` overrides of one fine-tuning run (pure: tested). An end-to-end search's settings
    (:func:`end_to_end_settings`) come after the protocol's lr and win over it; otherwise a (frozen-feature)
    recipe's loss settings come first and every method takes ``--lr`` and ``--backbone-lr-mult``."""
    searched = end_to_end_settings(tuned, method, bits)
    recipe = [] if searched else [o for o in tuned_overrides(tuned, method, bits) or [] if not o.startswith("optim.lr=")]
    name = run_name(method, bits, seed, args.image_size, getattr(args, "train_blocks", -1))
    if searched:  # its own run folder: resume=auto never continues a run made with other settings
        name += "-" + hashlib.sha1(json.dumps(searched).encode()).hexdigest()[:8]
    over = [
        f"dataset={args.dataset}", f"experiment={METHODS[method]}", *recipe,
        f"model.backbone={args.backbone}", f"model.weights={args.weights}", "model.freeze_backbone=false",
        f"data.image_size={args.image_size}", *partial_overrides(args), "data.download=false",
        f"data.sampling={args.sampling}", f"data.batch_size={args.batch_size}",
        f"data.images_per_class={args.images_per_class}", f"model.bits={bits}", f"seed={seed}",
        f"data.protocol.seed={seed}", f"trainer.max_steps={args.steps}", f"trainer.val_check_interval={args.val_every}",
        f"optim.lr={args.lr}", f"optim.backbone_lr_mult={args.backbone_lr_mult}",
        f"optim.lr_decay_steps={args.lr_decay_steps}", "trainer.test_after_fit=true",
        # cifar10.npz is sorted by class: "stable" tie-breaking would rank tied items in class order
        "eval.ties=average", "logger.name=csv", "trainer.progress_bar=false",
        f"output_dir={args.output_dir}", f"name={name}", "resume=auto",
    ] + searched
    if args.data_root:
        over.append(f"data.root={args.data_root}")
    if args.split_dir:
        over.append(f"data.split_dir={args.split_dir}")
    return over + list(args.override)


def partial_overrides(args) -> List[str]:
    """Which blocks train: ``--train-blocks N`` >= 0 trains the top N blocks on a cache of the frozen lower
    blocks' outputs (model.train_blocks, data.cache_features); -1 trains the whole network on images."""
    blocks = getattr(args, "train_blocks", -1)
    if blocks < 0:
        return ["data.cache_features=false"]
    return ["data.cache_features=true", f"model.train_blocks={blocks}", f"data.feature_dir={args.feature_dir}"]


def already_measured(rows: List[Dict], overrides: List[str]) -> bool:
    """Whether ``rows`` hold the run these overrides make: the same run folder name, which carries the method,
    bits, seed, image size, trained blocks and (for a searched entry) a hash of its settings."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    return any(Path(r.get("run_dir", "")).name == name for r in rows)


def method_slug(method: str) -> str:
    """A method's name in file and folder names: ``DRH+`` -> ``drhplus``, ``DSRH (paper)`` -> ``dsrh-paper``."""
    return method.lower().replace("+", "plus").replace(" (paper)", "-paper")


def run_name(method: str, bits: int, seed: int, image_size: int, train_blocks: int = -1) -> str:
    top = "" if train_blocks < 0 else f"-top{train_blocks}"
    slug = method_slug(method)
    return f"finetune-{slug}-{bits}b-{image_size}px{top}-s{seed}"


def run_one(args, method: str, bits: int, seed: int, tuned: dict) -> Dict:
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.train import train

    over = run_overrides(args, method, bits, seed, tuned)
    searched = bool(end_to_end_settings(tuned, method, bits))
    cfg = load_config(over)
    t0 = time.perf_counter()
    result = train(cfg)
    seconds = time.perf_counter() - t0
    return dict(method=method, bits=bits, seed=seed, image_size=args.image_size, backbone=args.backbone,
                searched=searched,
                train_blocks=getattr(args, "train_blocks", -1),
                steps=int(result["global_step"]), batch_size=args.batch_size, sampling=args.sampling,
                lr=float(cfg.optim.lr), backbone_lr_mult=float(cfg.optim.backbone_lr_mult), map=result["test/map"],
                precision_r2=result["test/precision_radius"], best_val_map=result.get("best_val_map"),
                database=int(result.get("test/num_database", 0)), queries=int(result.get("test/num_queries", 0)),
                seconds=round(seconds, 1), run_dir=result["run_dir"], overrides=over, commit=git_commit(),
                date=_dt.datetime.now().isoformat(timespec="seconds"), machine=machine())


def report(rows: List[Dict], source: str) -> List[str]:
    """The fine-tune block of docs/RESULTS.md (one row per method and protocol, markers included). ``source`` names the
    results file(s) the rows come from; the text depends only on the rows, not on the day it is written."""
    lines = [BEGIN]
    if not rows:
        return lines + ["No end-to-end run measured yet (`make bench-finetune`).", END]
    lines += [
        f"From {source} ({len(rows)} runs; commits "
        f"{', '.join(sorted({r['commit'] for r in rows}))}; machine: {'; '.join(sorted({r['machine'] for r in rows}))}; "
        f"measured {min(r['date'] for r in rows)} .. {max(r['date'] for r in rows)}). Mean ± standard deviation over "
        "the seeds listed; each run's row (lr, batch, database, seconds) is in the results file.", "",
    ] + summary(rows)[:-1]
    return lines + [END]


def summary(rows: List[Dict]) -> List[str]:
    """One line per (method, bits, image size, trained blocks, steps): the mean and sample standard deviation
    of test MAP@all over its seeds, best first within each code length; the per-run table follows it."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        # a run with its end-to-end search's settings is its own row, beside the same method without them
        label = r["method"] + (" (searched)" if r.get("searched") else "")
        groups.setdefault((r["bits"], r["image_size"], r.get("train_blocks", -1), r["steps"], label), []).append(r)

    def mean_sd(values: List[float]) -> str:
        if len(values) < 2:
            return f"{values[0]:.3f}"
        return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"

    lines = ["| method | bits | image size | trained blocks | steps | seeds | test MAP@all | precision r<=2 | "
             "best val MAP | minutes per run |", "|---|---|---|---|---|---|---|---|---|---|"]
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2], k[3], -statistics.mean(r["map"] for r in groups[k])))
    for key in order:
        rs = groups[key]
        bits, size, blocks, steps, method = key
        vals = [r["best_val_map"] for r in rs if r.get("best_val_map") is not None]
        lines.append(f"| {method} | {bits} | {size} px | {'all' if blocks < 0 else f'top {blocks}'} | {steps} | "
                     f"{', '.join(str(r['seed']) for r in sorted(rs, key=lambda r: r['seed']))} | "
                     f"{mean_sd([r['map'] for r in rs])} | {mean_sd([r['precision_r2'] for r in rs])} | "
                     f"{mean_sd(vals) if vals else '-'} | {statistics.mean(r['seconds'] for r in rs) / 60:.1f} |")
    return lines + [""]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", nargs="+", default=ABLATIONS, choices=list(METHODS))
    p.add_argument("--bits", type=int, nargs="+", default=[48])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    add_data_args(p, image_size=96)
    p.add_argument("--train-blocks", type=int, default=3,
                   help="model.train_blocks: the top N backbone blocks train on a cache of the lower blocks' outputs "
                        "(-1: the whole network trains on images)")
    p.add_argument("--feature-dir", default=str(REPO / "data" / "features"), help="where the cache is kept")
    p.add_argument("--split-dir", default=str(REPO / "data" / "splits"))
    p.add_argument("--sampling", default="balanced", help="balanced: class-balanced batches, triplets mined inside")
    p.add_argument("--batch-size", type=int, default=64, help="images per batch (balanced sampling)")
    p.add_argument("--images-per-class", type=int, default=8)
    add_schedule_args(p)
    p.add_argument("--lr", type=float, default=0.01, help="the heads' learning rate")
    p.add_argument("--backbone-lr-mult", type=float, default=1.0,
                   help="the backbone's lr as a multiple of --lr (1.0: the whole network at one lr, as in the paper)")
    p.add_argument("--tuned", default=str(REPO / "benchmarks" / "results" / "tuned_cpu.json"),
                   help="tune_cpu.py's JSON ('' = each experiment config as it is)")
    p.add_argument("--output-dir", default=str(REPO / "runs" / "finetune_cpu"))
    add_report_args(p, "finetune_cpu.jsonl")
    p.add_argument("--also-report", nargs="*", default=[],
                   help="other results files of this benchmark whose rows the report shows too (read only)")
    p.add_argument("--override", nargs="*", default=[], help="extra config overrides for every run")
    return p


def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    if args.tuned and not Path(args.tuned).is_file():
        p.error(f"--tuned {args.tuned}: no such file (run `make bench-tune`, or pass --tuned '' for the "
                "experiment configs as they are)")
    tuned = json.loads(Path(args.tuned).read_text()) if args.tuned else {}
    if not args.report_only:
        for seed in args.seeds:
            for bits in args.bits:
                for method in args.methods:
                    if already_measured(load_results(results), run_overrides(args, method, bits, seed, tuned)):
                        continue
                    row = run_one(args, method, bits, seed, tuned)
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(f"{method:5s} {bits} bits seed {seed}: test MAP {row['map']:.4f}  P@r2 "
                          f"{row['precision_r2']:.4f}  best val MAP {row['best_val_map']:.4f}  "
                          f"({row['seconds'] / 60:.1f} min)", flush=True)
    sources = list(dict.fromkeys(Path(f).resolve() for f in [results, *args.also_report]))  # each file once
    rows = [row for path in sources for row in load_results(path)]
    replace_block(Path(args.docs) / "RESULTS.md", BEGIN, END,
                  report(rows, ", ".join(f"`{repo_relative(path)}`" for path in sources)))


if __name__ == "__main__":
    main()
