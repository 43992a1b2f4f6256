"""Torch datasets over an in-memory :class:`~dsrh_lightning.data.sources.Source`."""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..seeding import apply_seeded, item_seed
from .sampling import sample_triplets

__all__ = ["IndexedImageDataset", "TripletDataset"]


class IndexedImageDataset(Dataset):
    """Images ``source.images[indices]``; items are ``(image, label, index)``.

    ``index`` is the position inside this subset (0..len-1), so evaluation can
    restore the original order after distributed gathering.

    With ``seed`` set, the (random) transform of item ``i`` is seeded by
    ``(seed, epoch, i)`` (:meth:`set_epoch`), so augmentation does not depend on
    the global random state: a resumed run augments exactly like an uninterrupted one.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray, transform: Callable,
                 seed: Optional[int] = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, i: int, seed: Optional[int] = None) -> torch.Tensor:
        """The transformed image of item ``i``; ``seed`` fixes its random augmentation."""
        image = self.images[self.indices[i]]
        return self.transform(image) if seed is None else apply_seeded(self.transform, image, seed)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def subset_labels(self) -> torch.Tensor:
        return self.labels[torch.as_tensor(self.indices)]

    def subset_labels_at(self, rows) -> torch.Tensor:
        """Labels of subset items ``rows``."""
        return self.labels[torch.as_tensor(self.indices[rows])]

    def __getitem__(self, i: int):
        seed = None if self.seed is None else item_seed(self.seed, self.epoch, i)
        return self.load(i, seed), self.labels[self.indices[i]], i


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
        if getattr(self, "epoch", None) == epoch:
            return
        self.epoch = epoch
        self.triplets = sample_triplets(self.labels, self.per_anchor, seed=self.seed * 100003 + epoch)

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, i: int):
        # Augmentation seeded by (seed, epoch, triplet, slot): independent of the global random state.
        rows = [int(j) for j in self.triplets[i]]
        images = [self.base.load(j, item_seed(self.seed, self.epoch, i, slot)) for slot, j in enumerate(rows)]
        labels = self.base.subset_labels_at(rows)
        return torch.stack(images), labels
