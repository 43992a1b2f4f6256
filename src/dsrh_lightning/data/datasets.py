"""Torch datasets over an in-memory :class:`~dsrh_lightning.data.sources.Source`."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from .sampling import sample_triplets

__all__ = ["IndexedImageDataset", "TripletDataset"]


class IndexedImageDataset(Dataset):
    """Images ``source.images[indices]``; items are ``(image, label, index)``.

    ``index`` is the position inside this subset (0..len-1), so evaluation can
    restore the original order after distributed gathering.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform: Callable) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def subset_labels(self) -> torch.Tensor:
        return self.labels[torch.as_tensor(self.indices)]

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.transform(self.images[j]), self.labels[j], i


class TripletDataset(Dataset):
    """Explicit (query, positive, negative) triplets over the training subset.

    Triplets are redrawn each epoch (``set_epoch``) from the labels with a seed
    derived from ``(seed, epoch)``, so a run is reproducible and a resumed run
    sees the same triplets. Items are ``(images (3, C, H, W), labels (3, ...))``.
    """

    def __init__(self, base: IndexedImageDataset, per_anchor: int, seed: int) -> None:
        self.base = base
        self.per_anchor = per_anchor
        self.seed = seed
        self.labels = base.subset_labels.numpy()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.triplets = sample_triplets(self.labels, self.per_anchor, seed=self.seed * 100003 + epoch)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int):
        items = [self.base[int(j)] for j in self.triplets[i]]
        return torch.stack([x for x, _, _ in items]), torch.stack([torch.as_tensor(y) for _, y, _ in items])
