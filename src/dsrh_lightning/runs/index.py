"""``dsrh index`` at scale: a collection encoded by Lightning's predict loop, in shards, resumable.

The items (a data split, or image files) are cut into shards of ``shard_size`` consecutive items. The
shards still missing are dealt to the processes round-robin (``trainer.devices`` x ``trainer.num_nodes``
under ``trainer.strategy``, as for training: one process, DDP on CPUs or GPUs, torchrun, SLURM); a
process encodes its shards batch by batch (batches start at the shard's first item, so codes do not
depend on the number of processes) and writes each finished shard at once, atomically
(:func:`~dsrh_lightning.search.shards.write_shard`). When every shard exists, rank 0 writes
``manifest.json`` last (:func:`~dsrh_lightning.search.shards.write_manifest`). Running the same command
again skips the shards already written: a run stopped by a crash, Ctrl-C or a kill loses at most the
shards in progress.

``out`` is a folder (a sharded index; format in :mod:`dsrh_lightning.search.codes_file`) or a file
ending ``.npz`` (one codes file: the shards are written to a hidden ``.<name>.parts`` folder beside it,
then joined and removed). The folder holds ``.plan.json`` (what is being indexed: checkpoint weights,
source, ids, shard size), so shards of another index are never mixed in: such a folder is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch

from ..errors import InputError
from ..files import TMP_MARK, tmp_path_for, write_text
from ..search.codes_file import CodesFileError, read_codes, write_codes
from ..search.shards import MANIFEST, shard_name, write_manifest, write_shard

__all__ = ["DEFAULT_SHARD_SIZE", "PLAN", "IndexPlan", "check_output", "index_collection"]

DEFAULT_SHARD_SIZE = 100_000
PLAN = ".plan.json"


@dataclass
class IndexPlan:
    """What an index folder holds: ``count`` items in shards of ``shard_size``, with their ids (and labels)."""

    count: int
    shard_size: int
    bits: int
    weights_hash: str
    checkpoint: str
    source: str
    ids_sha1: str

    @property
    def num_shards(self) -> int:
        return (self.count + self.shard_size - 1) // self.shard_size

    def bounds(self, shard: int):
        """``(first item, end)`` of ``shard``."""
        return shard * self.shard_size, min(self.count, (shard + 1) * self.shard_size)

    def as_json(self) -> dict:
        return {"format": "dsrh-index-plan", "version": 1, **self.__dict__}


def ids_digest(ids: Sequence[str]) -> str:
    h = hashlib.sha1()
    for i in ids:
        h.update(str(i).encode("utf-8", "surrogateescape") + b"\0")
    return h.hexdigest()


def check_output(out: Path) -> Path:
    """Check where the output goes before any work: ``out`` (a folder, or a ``.npz`` file) can be created
    and written. Returns the folder the shards go to. Raises :class:`InputError` naming ``--out``."""
    out = Path(out)
    single = out.suffix.lower() == ".npz"
    if single and out.is_dir():
        raise InputError(f"--out {out}: is a folder, but the name ends in .npz (one codes file); give a file "
                         "path, or a folder name without .npz for a sharded index")
    if not single and out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; a sharded index is a folder (or end the name in .npz for one "
                         "codes file)")
    folder = out.with_name(f".{out.name}.parts") if single else out
    where = out.parent if single else out  # the parts folder is made when encoding starts
    try:
        where.mkdir(parents=True, exist_ok=True)
        probe = tmp_path_for(where / "probe")
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise InputError(f"--out {out}: cannot write there ({exc.strerror or exc}); choose a writable place") \
            from None
    return folder


def _remove_stale_tmp(folder: Path) -> None:
    """Temporary shard files left by a process that no longer runs (``.<name>.tmp-<pid>-<random>``)."""
    for p in folder.glob(f".shard-*{TMP_MARK}*"):
        try:
            pid = int(p.name.split(TMP_MARK, 1)[1].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except (ValueError, PermissionError, OSError):
            continue


def finished_shards(folder: Path, plan: IndexPlan, ids: Sequence[str]) -> List[int]:
    """Shards of ``plan`` already written in ``folder``: readable, complete, same weights and ids."""
    done = []
    for s in range(plan.num_shards):
        path = folder / shard_name(s)
        if not path.is_file():
            continue
        lo, hi = plan.bounds(s)
        try:
            part = read_codes(path)
        except CodesFileError:
            continue  # rewritten below
        if len(part) == hi - lo and part.bits == plan.bits and part.weights_hash == plan.weights_hash and \
                np.array_equal(np.asarray(part.ids), np.asarray(ids[lo:hi], dtype=str)):
            done.append(s)
    return done


def _open_plan(folder: Path, plan: IndexPlan, write: bool) -> None:
    """Refuse a folder that holds (part of) another index; record ``plan`` otherwise."""
    path = folder / PLAN
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {}
        new = plan.as_json()
        keys = ("count", "shard_size", "bits", "weights_hash", "source", "ids_sha1")
        diff = [k for k in keys if old.get(k) != new[k]]
        if diff:
            what = ", ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in diff if k != "ids_sha1")
            if "ids_sha1" in diff:
                what = (what + "; " if what else "") + "other items"
            raise InputError(f"--out {folder}: holds another index ({what}). Give another --out, or delete the "
                             "folder to start over")
        return
    if any(folder.glob("shard-*.npz")) or (folder / MANIFEST).exists():
        raise InputError(f"--out {folder}: holds an index written without a plan (another tool or an older "
                         "version); give another --out or delete the folder")
    if write:
        write_text(path, json.dumps(plan.as_json(), indent=1) + "\n")


class _Batches(torch.utils.data.Sampler):
    """Item positions of this process's shards, in batches that start at each shard's first item."""

    def __init__(self, plan: IndexPlan, shards: Sequence[int], batch_size: int) -> None:
        self.batches = []
        for s in shards:
            lo, hi = plan.bounds(s)
            self.batches += [list(range(b, min(b + batch_size, hi))) for b in range(lo, hi, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class _Data(pl.LightningDataModule):
    def __init__(self, dataset, plan: IndexPlan, todo: List[int], batch_size: int, workers: int, batched: bool,
                 finish=None) -> None:
        super().__init__()
        self.dataset, self.plan, self.todo = dataset, plan, todo
        self.batch_size, self.workers, self.batched, self.finish = batch_size, workers, batched, finish

    def predict_dataloader(self):
        from torch.utils.data import DataLoader

        from ..data.datamodule import worker_init
        from ..data.datasets import BatchedFetch, unbatched

        trainer = self.trainer
        todo = trainer.strategy.broadcast(self.todo, src=0)  # every process deals the same list
        mine = todo[trainer.global_rank::trainer.world_size]
        # A process with no shard (fewer shards than processes) encodes item 0 once and discards it:
        # Lightning refuses a process without batches.
        self.idle = not mine
        sampler = _Batches(self.plan, mine, self.batch_size)
        if self.idle:
            sampler.batches = [[0]]
        if self.batched:
            return DataLoader(BatchedFetch(self.dataset), batch_sampler=sampler, num_workers=self.workers,
                              collate_fn=unbatched, worker_init_fn=worker_init)
        return DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers, worker_init_fn=worker_init)

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        return self.finish(batch) if self.finish is not None else batch


class _Encoder(pl.LightningModule):
    """``predict_step``: ``(item positions, {0,1} codes)`` of a batch ``(images, labels, positions)``."""

    def __init__(self, net: torch.nn.Module, threshold: float) -> None:
        super().__init__()
        self.net, self.threshold = net, float(threshold)

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        codes = (self.net(batch[0]).float() > self.threshold).to(torch.uint8)
        return torch.as_tensor(batch[2]).cpu(), codes.cpu()


class _ShardWriter(pl.Callback):
    """Collects a process's codes shard by shard and writes each shard when complete; rank 0 writes the
    manifest (and joins a single-file output) once every process is done."""

    def __init__(self, folder: Path, plan: IndexPlan, ids: Sequence[str], labels, finish) -> None:
        self.folder, self.plan, self.ids, self.labels, self.finish = folder, plan, ids, labels, finish
        self.rows: list = []
        self.codes: list = []
        self.written: List[int] = []
        self.interrupted = False

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if getattr(trainer.datamodule, "idle", False):
            return
        rows, codes = outputs
        self.rows.append(rows.numpy())
        self.codes.append(codes.numpy())
        shard = int(self.rows[0][0]) // self.plan.shard_size
        lo, hi = self.plan.bounds(shard)
        if int(rows[-1]) + 1 == hi:
            got = np.concatenate(self.rows)
            if not np.array_equal(got, np.arange(lo, hi)):  # batches come in order; anything else is a bug
                raise RuntimeError(f"shard {shard}: collected items {got[:5]}... are not {lo}..{hi - 1}")
            labels = None if self.labels is None else self.labels[lo:hi]
            write_shard(self.folder, shard, np.concatenate(self.codes), self.ids[lo:hi], labels,
                        checkpoint=self.plan.checkpoint, weights_hash=self.plan.weights_hash, source=self.plan.source)
            self.written.append(shard)
            self.rows, self.codes = [], []

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """Say what is kept: the shards written so far stay, and the same command continues from them."""
        self.interrupted = isinstance(exception, KeyboardInterrupt)
        if trainer.is_global_zero:
            done = sum((self.folder / shard_name(s)).is_file() for s in range(self.plan.num_shards))
            why = "Ctrl-C" if self.interrupted else type(exception).__name__
            print(f"dsrh index stopped ({why}): {done} of {self.plan.num_shards} shards are written in "
                  f"{self.folder}; run the same command again to encode the rest", file=sys.stderr, flush=True)

    def on_predict_end(self, trainer, pl_module) -> None:
        trainer.strategy.barrier("dsrh-index-shards-written")
        if trainer.is_global_zero:
            self.finish()


class _Progress(pl.Callback):
    """One bar for the whole collection (rank 0; other processes are counted as going at its pace)."""

    def __init__(self, total: int, done: int, enabled: bool) -> None:
        self.total, self.done, self.enabled, self.bar = total, done, enabled, None

    def on_predict_start(self, trainer, pl_module) -> None:
        if self.enabled and trainer.is_global_zero:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, initial=self.done, unit="img", desc="encoding", file=sys.stderr,
                            dynamic_ncols=True, mininterval=1.0)
            self.world = trainer.world_size

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self.bar is not None:
            self.bar.update(min(len(outputs[0]) * self.world, self.total - self.bar.n))

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.bar is not None:
            self.bar.update(self.total - self.bar.n)
            self.bar.close()


def _trainer(cfg, callbacks, root: Path) -> pl.Trainer:
    from ..config import parse_devices
    from ..lightning.resources import resolve_precision, resolve_threads

    import warnings

    t = cfg.trainer
    torch.set_num_threads(resolve_threads(t))
    # _Batches returns every item (batches never drop one); Lightning cannot know that and says so.
    warnings.filterwarnings("ignore", message=".*custom batch sampler.*")
    return pl.Trainer(accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes,
                      strategy=t.strategy, precision=resolve_precision(t), logger=False, callbacks=callbacks,
                      enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                      use_distributed_sampler=False, default_root_dir=str(root))


def index_collection(ckpt: Path, out: Path, split: Optional[str] = None, files: Optional[Sequence[Path]] = None,
                     overrides: Sequence[str] = (), shard_size: int = DEFAULT_SHARD_SIZE, batch_size: int = 0,
                     workers: int = 0, progress: bool = True, log=print) -> dict:
    """Encode ``split`` of the checkpoint's data set, or the image ``files``, into ``out`` (see the module
    docstring). ``overrides`` (``key=value``) change the run's config: ``data.root``, ``trainer.devices``, ...
    Returns ``{"count", "bits", "shards", "skipped", "out"}`` (``skipped``: shards found already written)."""
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    from ..lightning.loggers import quiet_lightning_tips
    from ..search.encode import encoder, image_dataset, split_dataset
    from .checkpoints import load_run

    quiet_lightning_tips()
    if (split is None) == (files is None):
        raise ValueError("give either split or files")
    if isinstance(shard_size, bool) or int(shard_size) < 1:
        raise InputError(f"--shard-size must be a positive number of images, got {shard_size}")
    out = Path(out)
    folder = check_output(out)  # before the checkpoint and the data: a bad --out fails at once
    run = load_run(ckpt, overrides)
    cfg = run.cfg
    if split is not None:
        dataset, ids, labels = split_dataset(cfg, split)
        net, source, batched = run.module, f"split={split} of {cfg.data.dataset}", True
        bt = getattr(dataset, "batch_transform", None)
        finish = _finisher(bt) if bt is not None else None
    else:
        dataset, ids, labels = image_dataset(files, cfg), [str(f) for f in files], None
        net, source, batched, finish = encoder(run), "images", False, None
    if len(ids) == 0:
        raise InputError(f"nothing to index: {source} is empty")
    plan = IndexPlan(len(ids), int(shard_size), int(cfg.model.bits), run.weights_hash, str(Path(ckpt).resolve()),
                     source, ids_digest(ids))
    rank0 = rank_zero_only.rank == 0
    folder.mkdir(exist_ok=True)
    _open_plan(folder, plan, write=rank0)
    if rank0:
        _remove_stale_tmp(folder)
    done = finished_shards(folder, plan, ids)
    todo = [s for s in range(plan.num_shards) if s not in done]
    if done and rank0:
        log(f"{out}: {len(done)} of {plan.num_shards} shards already written; encoding the other {len(todo)}")

    def finish_index() -> None:
        counts = [plan.bounds(s)[1] - plan.bounds(s)[0] for s in range(plan.num_shards)]
        write_manifest(folder, counts, plan.bits, plan.checkpoint, plan.weights_hash, plan.source)
        if folder != out:  # one codes file: join the shards, then drop them
            parts = [read_codes(folder / shard_name(s)) for s in range(plan.num_shards)]
            bits = np.concatenate([p.unpacked() for p in parts])
            write_codes(out, bits, ids, labels, checkpoint=plan.checkpoint, weights_hash=plan.weights_hash,
                        source=plan.source)
            shutil.rmtree(folder, ignore_errors=True)

    if not todo:
        if rank0:
            finish_index()
        return {"count": plan.count, "bits": plan.bits, "shards": plan.num_shards, "skipped": len(done),
                "out": str(out)}
    writer = _ShardWriter(folder, plan, ids, labels, finish_index)
    bs = int(batch_size or cfg.data.eval_batch_size)
    data = _Data(dataset, plan, todo, bs, int(workers), batched, finish)
    callbacks = [writer, _Progress(plan.count, sum(plan.bounds(s)[1] - plan.bounds(s)[0] for s in done), progress)]
    trainer = _trainer(cfg, callbacks, folder)
    try:
        trainer.predict(_Encoder(net, cfg.eval.threshold), datamodule=data, return_predictions=False)
    except SystemExit:
        if writer.interrupted:  # Lightning turns Ctrl-C into exit code 1; a stopped index says 130
            raise SystemExit(130) from None
        raise
    return {"count": plan.count, "bits": plan.bits, "shards": plan.num_shards, "skipped": len(done), "out": str(out),
            "rank": trainer.global_rank}


def _finisher(batch_transform):
    """Finish device-path batches (uint8 images travelling raw) on the device, as the data module does."""
    from ..data.datasets import RawImages

    def finish(batch):
        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], RawImages):
            raw = batch[0]
            images = batch_transform(raw.pixels.reshape(-1, *raw.pixels.shape[-3:]), None)
            batch = (images.reshape(*raw.lead, *images.shape[1:]), *batch[1:])
        return batch

    return finish
