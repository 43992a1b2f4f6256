"""Encoding images or a data split into binary codes with a loaded :class:`~dsrh_lightning.runs.checkpoints.Run`."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..metrics.codes import binarize
from .images import MAX_IMAGE_PIXELS, ImagePaths
from .preprocess import EvalPreprocess, native_image_size

__all__ = ["encoder", "encode", "eval_transform", "image_dataset", "split_dataset", "native_image_size"]


def eval_transform(cfg) -> EvalPreprocess:
    """uint8 ``(H, W, 3)`` picture -> the network input the checkpoint's evaluation used (any picture size)."""
    return EvalPreprocess(cfg)


def encoder(run) -> torch.nn.Module:
    """``images -> relaxed codes`` for ``run``. A run trained on cached backbone features
    (``data.cache_features``) gets its backbone back in front (built as the feature cache was:
    pretrained weights, or the seeded random init for ``model.weights=none``)."""
    if not run.feature_dim:
        return run.module
    from ..models import build_backbone

    m = run.cfg.model
    if m.weights == "none":
        torch.manual_seed(int(run.cfg.seed))
    backbone = build_backbone(m.backbone, m.weights, m.hash_input)[0].eval()
    return torch.nn.Sequential(backbone, run.module).eval()


@torch.no_grad()
def encode(model, dataset, threshold: float, batch_size: int = 256, num_workers: int = 0,
           progress: bool = True, desc: str = "encoding") -> np.ndarray:
    """Binary codes ``(n, bits)`` uint8 of every item of ``dataset`` (items ``(image, ...)``)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(model.parameters()).device
    out = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        out.append(binarize(model(batch[0].to(device)).float(), threshold).cpu())
    return torch.cat(out).numpy()


def image_dataset(paths: Sequence[Path], cfg, max_pixels: int = MAX_IMAGE_PIXELS) -> ImagePaths:
    """Image files as the network input of ``cfg``'s evaluation (resized to its input size)."""
    return ImagePaths(paths, EvalPreprocess(cfg), max_pixels)


def split_dataset(cfg, split: str):
    """``(dataset, ids, labels)`` of ``split`` (database | query | train) of the configured data set.

    Image ids are absolute paths (list data sets: resolved against ``data.root``, where the images are);
    in-memory data sets give ``<dataset>#<source index>``.
    With ``data.cache_features`` the items are the cached backbone features (as in training).
    """
    from ..data.datamodule import HashingDataModule
    from ..data.datasets import IndexedImageDataset
    from ..data.image_list import ImageFiles
    from ..models import build_backbone

    if split not in ("database", "query", "train"):
        from ..errors import InputError
        raise InputError(f"split={split}: expected split=database, split=query or split=train")
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("test")
    source = dm.source
    positions = np.asarray(getattr(dm.split, split), dtype=np.int64)
    ref = dm.query  # evaluation transform (identity for cached features), never the training augmentation
    # The evaluation transform of the split: per image (worker path) and/or batched (device path).
    ds = IndexedImageDataset(ref.images, source.labels, positions, ref.transform,
                             batch_transform=getattr(ref, "batch_transform", None))
    if isinstance(source.images, ImageFiles):
        root = Path(source.images.root)
        ids = [str((root / source.images.paths[j]).resolve()) for j in positions]
    else:
        ids = [f"{source.name}#{j}" for j in positions]
    return ds, ids, np.asarray(source.labels)[positions]
