"""Encoding throughput: images/s of ``dsrh index`` (Lightning's predict loop, data loading, shard writing)
against the model-only forward pass on the same batches.

(a) ``dsrh index``: :func:`dsrh_lightning.runs.index.index_collection` on a split of the checkpoint's
    data set, timed end to end after the checkpoint is opened once (a fresh output folder per repeat),
    on the checkpoint's ``trainer.*`` keys with the given overrides;
(b) model only: the same split's first ``--model-batches`` batches, preprocessed beforehand and already on
    the device, through the same network (``torch.no_grad``) and the threshold: the ceiling.

Reports images/s of both and their ratio (goal: (a) >= 90% of (b) for a real model and collection).
One process (for several devices, time ``dsrh index ... trainer.devices=N`` itself). Without ``--ckpt`` it
trains a step of a tiny synthetic model first (checks the harness, seconds):

    python -m benchmarks.index_throughput
    python -m benchmarks.index_throughput --ckpt runs/NAME/checkpoints/last.ckpt --split database \\
        --batch-size 256 --workers 8 --repeats 3 trainer.accelerator=gpu trainer.devices=1   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _tiny_checkpoint(folder: Path, per_class: int) -> Path:
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.train import train

    cfg = load_config(["dataset=synthetic", f"output_dir={folder}", "name=bench", f"data.synthetic_per_class={per_class}",
                       "data.protocol.query_per_class=2", "data.protocol.train_per_class=10",
                       "data.protocol.val_per_class=2", "data.batch_size=8", "trainer.max_steps=1",
                       "trainer.val_check_interval=1", "trainer.progress_bar=false", "trainer.accelerator=cpu",
                       "trainer.test_after_fit=false", "logger.name=none", "model.backbone=small_cnn",
                       "model.weights=none", "data.num_workers=0", f"data.split_dir={folder / 'splits'}"])
    return Path(train(cfg)["last_checkpoint"])


@torch.no_grad()
def model_only(ckpt: Path, split: str, overrides, batch_size: int, device: str, repeats: int,
               max_batches: int) -> dict:
    """images/s of the network alone on the split's first ``max_batches`` preprocessed batches, already on
    ``device`` (all of them would not fit: 59,000 CIFAR-10 images at 224 px are 35 GB of floats)."""
    from dsrh_lightning.runs.checkpoints import load_run
    from dsrh_lightning.search.encode import split_dataset

    run = load_run(ckpt, overrides)
    ds, ids, _ = split_dataset(run.cfg, split)
    net = run.module.to(device).eval()
    bs = batch_size or int(run.cfg.data.eval_batch_size)
    batches = []
    for s in range(0, min(len(ids), bs * max_batches), bs):
        x = ds.fetch(list(range(s, min(s + bs, len(ids)))))[0]
        if not torch.is_tensor(x):  # device path: raw uint8, finished as the data module does
            x = ds.batch_transform(x.pixels, None)
        batches.append(x.to(device))
    threshold = float(run.cfg.eval.threshold)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for x in batches:
            (net(x) > threshold).to(torch.uint8).cpu()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = min(times[1:])
    n = sum(len(x) for x in batches)
    return {"images": n, "seconds": round(best, 4), "images_per_s": round(n / best, 1)}


def index_run(ckpt: Path, split: str, overrides, batch_size: int, workers: int, repeats: int,
              shard_size: int) -> dict:
    """images/s of index_collection, end to end, best of ``repeats`` (after one warm-up run)."""
    from dsrh_lightning.runs.index import index_collection

    times, count = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats + 1):
            t0 = time.perf_counter()
            res = index_collection(ckpt, Path(tmp) / f"out{r}", split=split, overrides=overrides,
                                   shard_size=shard_size, batch_size=batch_size, workers=workers, progress=False,
                                   log=lambda m: None)
            times.append(time.perf_counter() - t0)
            count = res["count"]
    best = min(times[1:])
    return {"images": count, "seconds": round(best, 4), "images_per_s": round(count / best, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="checkpoint (default: a tiny synthetic one, trained first)")
    p.add_argument("--split", default="database")
    p.add_argument("--batch-size", type=int, default=0, help="default: data.eval_batch_size")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--shard-size", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--model-batches", type=int, default=50,
                   help="batches held on the device for the model-only pass (its images/s comes from them)")
    p.add_argument("--device", default=None, help="device of the model-only pass (default: cuda if available)")
    p.add_argument("--tiny-per-class", type=int, default=40, help="images per class of the tiny synthetic set")
    p.add_argument("overrides", nargs="*", help="key=value for the checkpoint's config (trainer.*, data.root, ...)")
    args = p.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.ckpt) if args.ckpt else _tiny_checkpoint(Path(tmp), args.tiny_per_class)
        overrides = list(args.overrides)
        if not any(o.startswith("trainer.accelerator=") for o in overrides):
            overrides.append(f"trainer.accelerator={'gpu' if device.startswith('cuda') else 'cpu'}")
        ceiling = model_only(ckpt, args.split, overrides, args.batch_size, device, args.repeats, args.model_batches)
        indexed = index_run(ckpt, args.split, overrides, args.batch_size, args.workers, args.repeats,
                            args.shard_size)
    result = {"checkpoint": str(args.ckpt or "tiny synthetic"), "split": args.split, "overrides": overrides,
              "model_only": ceiling, "dsrh_index": indexed,
              "ratio": round(indexed["images_per_s"] / ceiling["images_per_s"], 3)}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
