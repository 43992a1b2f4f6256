"""Frozen-backbone feature cache: backbone features computed once, stored on disk, reused.

With ``data.cache_features=true`` the data module replaces every image by its
backbone feature vector (eval mode, no augmentation), and the network's backbone
becomes the identity: only the hash and classification heads train, through the
same LightningModule, losses and evaluation callback. The cache file is keyed by
backbone, weights, input size, normalisation and a fingerprint of the data (and by
the seed when the backbone is randomly initialised), so a stale cache is never read.

With ``model.train_blocks=N`` (partial fine-tuning) the cache holds the output of the
frozen lower part of the backbone instead (``(n, C, H, W)`` per image), keyed also by
``N``; the top ``N`` blocks and both streams train on it.

Extraction runs in chunks, each written atomically to ``<cache>.parts/`` as it finishes;
an extraction stopped by Ctrl-C (or killed) keeps its finished chunks and the next run
skips them. The finished cache is one ``.npz`` file and the chunks are removed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np
import torch
from torch import nn

from ..errors import DataError
from ..files import atomic_write, write_text

__all__ = ["ExtractionInterrupted", "FeatureRows", "data_fingerprint", "extract_features", "feature_cache_path",
           "load_or_extract_features"]

log = logging.getLogger(__name__)


def data_fingerprint(images, labels: np.ndarray) -> str:
    """sha1 of the images (bytes of an in-memory array, or the file paths of lazy image files) and labels."""
    h = hashlib.sha1()
    if isinstance(images, np.ndarray):
        h.update(str(images.shape).encode())
        h.update(np.ascontiguousarray(images).data)
    else:
        h.update(str(len(images)).encode())
        for p in getattr(images, "paths", []):
            h.update(str(p).encode())
    h.update(np.ascontiguousarray(labels).data)
    return h.hexdigest()[:16]


def feature_cache_path(cache_dir: Path, dataset: str, backbone: str, weights: str, image_size: int,
                       fingerprint: str, norm: str = "imagenet", seed: Optional[int] = None,
                       hash_input: str = "last", below_last_blocks: int = 0) -> Path:
    """``<cache_dir>/<dataset>-<backbone>-<weights>-<size>px-<norm>-<fingerprint>[-seed<s>][-<hash_input>]
    [-below<N>].npz``: ``hash_input`` when not ``last`` (VGG's fc6+fc7 features differ from fc7's), and
    ``below<N>`` for the output of the frozen part under the last ``N`` blocks (partial fine-tuning)."""
    seed_part = f"-seed{seed}" if seed is not None else ""
    input_part = f"-{hash_input}" if hash_input != "last" else ""
    split_part = f"-below{int(below_last_blocks)}" if below_last_blocks else ""
    return Path(cache_dir) / (f"{dataset}-{backbone}-{weights}-{image_size}px-{norm}-{fingerprint}{seed_part}"
                              f"{input_part}{split_part}.npz")


@torch.inference_mode()
def extract_features(backbone: nn.Module, images, indices: np.ndarray, transform: Optional[Callable],
                     batch_size: int = 128, progress: bool = True, desc: str = "features",
                     batch_transform: Optional[Callable] = None, bar=None) -> np.ndarray:
    """Backbone features of ``images[indices]`` in eval mode: ``(len(indices), d)`` float32, or
    ``(len(indices), C, H, W)`` for the lower part of a backbone (partial fine-tuning). ``bar``: a tqdm
    bar to advance (the caller's, for a whole extraction made of several calls) instead of a new one.

    ``transform`` maps one image to a ``(C, H, W)`` tensor (the evaluation
    transform: resize + normalise, no augmentation). ``batch_transform`` (in-memory uint8 arrays only)
    does the same to a whole ``(n, H, W, 3)`` batch on the backbone's device in one operation
    (:class:`~dsrh_lightning.data.transforms.BatchTransform`), and is then used instead.
    """
    from tqdm.auto import tqdm

    was_training = backbone.training
    backbone.eval()
    batched = batch_transform is not None and isinstance(images, np.ndarray)
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    out = []
    own_bar = bar is None
    if own_bar:
        bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, mininterval=5.0)
    try:
        for start in range(0, len(indices), batch_size):
            chunk = np.asarray(indices[start:start + batch_size], dtype=np.int64)
            if batched:
                batch = batch_transform(torch.from_numpy(images[chunk]).to(device))
            else:
                batch = torch.stack([transform(images[int(j)]) for j in chunk]).to(device)
            feats = backbone(batch).float()
            if feats.ndim not in (2, 4):
                raise ValueError(f"backbone returned features of shape {tuple(feats.shape)}; expected (b, d) "
                                 "or (b, C, H, W)")
            out.append(feats.cpu().numpy())
            bar.update(len(batch))
    finally:
        if own_bar:
            bar.close()
        backbone.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


class FeatureRows:
    """Row access ``rows[j] -> (d,) float32 tensor`` for source index ``j``, over features stored
    for a subset ``indices`` of the source (drop-in for the image array of the datasets)."""

    def __init__(self, features: np.ndarray, indices: np.ndarray, num_source: int) -> None:
        self.features = features
        self._table = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        self.position = np.full(num_source, -1, dtype=np.int64)
        self.position[indices] = np.arange(len(indices))

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def __len__(self) -> int:
        return len(self.position)

    def gather(self, sources: np.ndarray) -> torch.Tensor:
        """``(len(sources), d)`` features of source indices ``sources``: one tensor index."""
        pos = self.position[np.asarray(sources, dtype=np.int64)]
        if len(pos) and pos.min() < 0:
            raise IndexError(f"source image {int(np.asarray(sources)[pos < 0][0])} has no cached feature")
        # index_select, not table[idx]: multi-dimensional advanced indexing is far slower on CPU here.
        return self._table.index_select(0, torch.from_numpy(pos))

    def __getitem__(self, j: int) -> torch.Tensor:
        pos = self.position[int(j)]
        if pos < 0:
            raise IndexError(f"source image {j} has no cached feature")
        return torch.from_numpy(self.features[pos])


def feature_statistics(features: np.ndarray, fit_rows: np.ndarray, eps: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Per-column ``(mean (d,), std (d,))`` float32 of the rows ``fit_rows`` (m,) of ``features`` (n, d),
    for ``data.feature_norm=standardize`` (z = (x - mean) / std). Population std (float64 sums); a
    column whose std is below ``eps`` gets std 1 (centred, not scaled)."""
    fit = np.asarray(features, dtype=np.float64)[np.asarray(fit_rows, dtype=np.int64)]
    if len(fit) == 0:
        raise ValueError("feature_statistics: no rows to compute the statistics from")
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    return mean.astype(np.float32), np.where(std < eps, 1.0, std).astype(np.float32)


class ExtractionInterrupted(SystemExit):
    """Feature extraction stopped by Ctrl-C; the finished chunks are kept. A ``SystemExit`` with the
    shell's code for SIGINT (130): the process ends without a traceback; ``message`` says what is kept."""

    def __init__(self, message: str) -> None:
        super().__init__(130)
        self.message = message


def _chunk_file(parts: Path, i: int) -> Path:
    return parts / f"chunk-{i:05d}.npy"


def _read_chunk(path: Path, rows: int, mmap: bool = False) -> Optional[np.ndarray]:
    """A finished chunk, or None when it is missing or does not hold ``rows`` rows. ``mmap``: memory-map
    it (reads the header only, to check a chunk without loading it)."""
    if not path.is_file():
        return None
    try:
        arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
    except (OSError, ValueError):
        return None
    return arr if arr.ndim >= 2 and len(arr) == rows else None


def _cache_hit(path: Path, needed: np.ndarray, say_missing: bool = False) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(features, indices)`` of the finished cache at ``path`` when it covers ``needed``, else None."""
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        idx, feats = data["indices"], data["features"]
    if np.isin(needed, idx).all():
        log.info("feature cache hit: %s (%s)", path, " x ".join(map(str, feats.shape)))
        return feats, idx
    if say_missing:
        log.info("feature cache %s lacks %d images; extracting all needed", path, int((~np.isin(needed, idx)).sum()))
    return None


def _join_chunks(parts: Path, rows: List[int]) -> np.ndarray:
    """The chunks of ``parts/`` (``rows[i]`` rows each) in one float32 array, filled chunk by chunk."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    first = _read_chunk(_chunk_file(parts, 0), rows[0], mmap=True)
    out = np.empty((sum(rows), *first.shape[1:]), np.float32)
    at = 0
    for i, n in enumerate(rows):
        chunk = _read_chunk(_chunk_file(parts, i), n, mmap=True)
        if chunk is None or chunk.shape[1:] != out.shape[1:]:
            raise DataError(f"{_chunk_file(parts, i)}: chunk missing or of another shape; delete {parts} and "
                             "run again")
        out[at:at + n] = chunk
        at += n
    return out


def _open_parts(parts: Path, key: str) -> None:
    """``parts/`` for the chunks of extraction ``key``; chunks of another extraction are removed."""
    manifest = parts / "manifest.json"
    if parts.is_dir():
        try:
            same = json.loads(manifest.read_text()).get("key") == key
        except (OSError, ValueError):
            same = False
        if not same:
            shutil.rmtree(parts)
    if not parts.is_dir():
        parts.mkdir(parents=True)
        write_text(manifest, json.dumps({"key": key}))


def load_or_extract_features(path: Path, needed: np.ndarray, make_backbone: Callable[[], nn.Module], images,
                             transform: Optional[Callable], meta: dict, batch_size: int = 128,
                             progress: bool = True, batch_transform: Optional[Callable] = None,
                             chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Features for the source indices ``needed`` from the cache at ``path``, extracting (and saving)
    when the file is missing or does not cover them. Returns ``(features (n, ...), indices (n,))``.

    Extraction writes chunks of ``chunk_size`` images (rounded up to whole batches) to ``<path>.parts/``
    atomically and skips chunks already there, so an interrupted extraction continues where it stopped
    and gives the same cache as an uninterrupted one. Ctrl-C raises :class:`ExtractionInterrupted`
    after printing one line.
    """
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    path = Path(path)
    hit = _cache_hit(path, needed, say_missing=True)
    if hit is not None:
        return hit
    from tqdm.auto import tqdm

    batch_size = int(batch_size)
    chunk = max(batch_size, -(-int(chunk_size) // batch_size) * batch_size)  # whole batches per chunk
    key = hashlib.sha1(needed.tobytes() + f"{chunk}/{batch_size}/{json.dumps(meta, sort_keys=True)}".encode())
    parts = path.with_name(path.name + ".parts")
    path.parent.mkdir(parents=True, exist_ok=True)
    _open_parts(parts, key.hexdigest()[:16])
    starts = list(range(0, len(needed), chunk))
    done = [_read_chunk(_chunk_file(parts, i), len(needed[s:s + chunk]), mmap=True) is not None
            for i, s in enumerate(starts)]
    todo = len(needed) - sum(len(needed[s:s + chunk]) for s, d in zip(starts, done) if d)
    if any(done):
        log.info("feature extraction continues: %d of %d chunks already in %s", sum(done), len(starts), parts)
    backbone = make_backbone() if not all(done) else None
    t0 = time.perf_counter()
    bar = tqdm(total=len(needed), initial=len(needed) - todo, desc=path.stem, unit="img", disable=not progress,
               mininterval=5.0)
    finished = sum(done)
    try:
        for i, s in enumerate(starts):
            if done[i]:
                continue
            feats = extract_features(backbone, images, needed[s:s + chunk], transform, batch_size, progress,
                                     batch_transform=batch_transform, bar=bar)
            try:
                with atomic_write(_chunk_file(parts, i)) as f:
                    np.save(f, feats.astype(np.float32), allow_pickle=False)
            except FileNotFoundError:  # parts/ is gone: another process (a DDP rank) finished the cache
                hit = _cache_hit(path, needed)
                if hit is None:
                    raise
                bar.close()
                return hit
            finished += 1
    except KeyboardInterrupt:
        bar.close()
        msg = (f"feature extraction interrupted: {finished} of {len(starts)} chunks kept in {parts}; "
               "run the same command again to continue")
        print(f"\n{msg}", file=sys.stderr, flush=True)
        raise ExtractionInterrupted(msg) from None
    bar.close()
    seconds = time.perf_counter() - t0
    try:
        feats = _join_chunks(parts, [len(needed[s:s + chunk]) for s in starts])
    except ValueError:
        hit = _cache_hit(path, needed)  # another process finished first and removed the chunks
        if hit is None:
            raise
        return hit
    meta = dict(meta, seconds=round(seconds, 1), images=int(todo),
                images_per_second=round(todo / max(seconds, 1e-9), 2))
    with atomic_write(path) as f:  # streamed into the file: no second in-memory copy of a large cache
        np.savez(f, features=feats, indices=needed, meta=json.dumps(meta))
    shutil.rmtree(parts, ignore_errors=True)
    log.info("feature cache written: %s (%s, %.1f img/s)", path, " x ".join(map(str, feats.shape)),
             meta["images_per_second"])
    return feats, needed
