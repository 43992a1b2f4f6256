"""Frozen-backbone feature cache: backbone features computed once, stored on disk, reused.

With ``data.cache_features=true`` the data module replaces every image by its
backbone feature vector (eval mode, no augmentation), and the network's backbone
becomes the identity: only the hash and classification heads train, through the
same LightningModule, losses and evaluation callback. The cache file is keyed by
backbone, weights, input size, normalisation and a fingerprint of the data (and by
the seed when the backbone is randomly initialised), so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

__all__ = ["FeatureRows", "data_fingerprint", "extract_features", "feature_cache_path", "load_or_extract_features"]

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
                       fingerprint: str, norm: str = "imagenet", seed: Optional[int] = None) -> Path:
    """``<cache_dir>/<dataset>-<backbone>-<weights>-<size>px-<norm>-<fingerprint>[-seed<s>].npz``."""
    seed_part = f"-seed{seed}" if seed is not None else ""
    return Path(cache_dir) / f"{dataset}-{backbone}-{weights}-{image_size}px-{norm}-{fingerprint}{seed_part}.npz"


@torch.inference_mode()
def extract_features(backbone: nn.Module, images, indices: np.ndarray, transform: Optional[Callable],
                     batch_size: int = 128, progress: bool = True, desc: str = "features",
                     batch_transform: Optional[Callable] = None) -> np.ndarray:
    """Backbone features of ``images[indices]`` in eval mode: ``(len(indices), d)`` float32.

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
    bar = tqdm(total=len(indices), desc=desc, unit="img", disable=not progress, mininterval=5.0)
    try:
        for start in range(0, len(indices), batch_size):
            chunk = np.asarray(indices[start:start + batch_size], dtype=np.int64)
            if batched:
                batch = batch_transform(torch.from_numpy(images[chunk]).to(device))
            else:
                batch = torch.stack([transform(images[int(j)]) for j in chunk]).to(device)
            feats = backbone(batch).float()
            if feats.ndim != 2:
                raise ValueError(f"backbone returned features of shape {tuple(feats.shape)}; expected (b, d)")
            out.append(feats.cpu().numpy())
            bar.update(len(batch))
    finally:
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


def load_or_extract_features(path: Path, needed: np.ndarray, make_backbone: Callable[[], nn.Module], images,
                             transform: Optional[Callable], meta: dict, batch_size: int = 128,
                             progress: bool = True,
                             batch_transform: Optional[Callable] = None) -> tuple[np.ndarray, np.ndarray]:
    """Features for the source indices ``needed`` from the cache at ``path``, extracting (and saving)
    when the file is missing or does not cover them. Returns ``(features (n, d), indices (n,))``."""
    needed = np.unique(np.asarray(needed, dtype=np.int64))
    path = Path(path)
    if path.is_file():
        with np.load(path, allow_pickle=False) as data:
            idx, feats = data["indices"], data["features"]
        if np.isin(needed, idx).all():
            log.info("feature cache hit: %s (%d x %d)", path, *feats.shape)
            return feats, idx
        log.info("feature cache %s lacks %d images; extracting all needed", path, int((~np.isin(needed, idx)).sum()))
    backbone = make_backbone()
    t0 = time.perf_counter()
    feats = extract_features(backbone, images, needed, transform, batch_size, progress, desc=path.stem,
                             batch_transform=batch_transform)
    seconds = time.perf_counter() - t0
    meta = dict(meta, seconds=round(seconds, 1), images=int(len(needed)),
                images_per_second=round(len(needed) / max(seconds, 1e-9), 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.npz")
    np.savez(tmp, features=feats.astype(np.float32), indices=needed, meta=json.dumps(meta))
    tmp.replace(path)
    log.info("feature cache written: %s (%d x %d, %.1f img/s)", path, *feats.shape, meta["images_per_second"])
    return feats, needed
