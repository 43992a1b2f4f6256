"""Label-derived triplet sampling.

Two ways to get triplets (ARCHITECTURE.md: samplers/miners return indices, losses
consume them):

* :func:`sample_triplets` draws explicit (query, positive, negative) index
  triplets from labels, as in the paper: the positive is relevant to the query,
  the negative is not.
* :class:`ClassBalancedBatchSampler` yields batches of P classes x K images;
  the ranking losses then use every valid triplet inside a batch
  (:mod:`dsrh_lightning.losses.miners`) so that each image is forwarded once.

Relevance always comes from :mod:`dsrh_lightning.relevance`.
"""

from __future__ import annotations

from typing import Iterator, List

import numpy as np
import torch

from ..errors import DataError
from ..relevance import relevance_matrix
from .distributed import ResumableBatches

__all__ = ["sample_triplets", "ClassBalancedBatchSampler"]


def sample_triplets(labels: np.ndarray, per_anchor: int, seed: int) -> np.ndarray:
    """Explicit triplets for every anchor.

    Args:
        labels: ``(n,)`` class ids or ``(n, c)`` multi-hot labels of the training images.
        per_anchor: triplets drawn for each anchor.
        seed: the draw is a pure function of ``(labels, per_anchor, seed)``.

    Returns:
        ``(n * per_anchor, 3)`` int64 array of (anchor, positive, negative) row
        indices into ``labels``; the positive is relevant to the anchor and not the
        anchor itself, the negative is irrelevant.

    Raises:
        ValueError: when some anchor has no possible positive or no negative.
    """
    lab = torch.as_tensor(labels)
    n = len(lab)
    rng = np.random.default_rng(seed)
    out = np.empty((n * per_anchor, 3), dtype=np.int64)
    if lab.ndim == 1:
        return _sample_single_label(lab.numpy(), per_anchor, rng)
    rel = relevance_matrix(lab, lab).numpy()
    np.fill_diagonal(rel, False)
    for a in range(n):
        if not rel[a].any():
            raise DataError(f"training image {a} shares no label with any other training image; no positive exists")
        if rel[a].sum() == n - 1:
            raise DataError(f"training image {a} shares a label with every other training image; no negative exists")
    for rep in range(per_anchor):
        for a in range(n):
            pos = np.flatnonzero(rel[a])
            neg = np.flatnonzero(~rel[a])
            neg = neg[neg != a]
            out[rep * n + a] = (a, rng.choice(pos), rng.choice(neg))
    return out


def _sample_single_label(labels: np.ndarray, per_anchor: int, rng: np.random.Generator) -> np.ndarray:
    """Vectorised :func:`sample_triplets` for class ids (uniform positive and negative)."""
    n = len(labels)
    classes, inverse, sizes = np.unique(labels, return_inverse=True, return_counts=True)
    if len(classes) < 2:
        raise DataError("triplets need at least 2 classes in the training set")
    small = classes[sizes < 2]
    if len(small):
        raise DataError(f"classes {small.tolist()} have 1 training image; triplets need at least 2 per class")
    order = np.argsort(inverse, kind="stable")          # images grouped by class, index order inside
    start = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # where each class's block begins in `order`
    rank_in_class = np.empty(n, dtype=np.int64)
    rank_in_class[order] = np.arange(n) - start[inverse[order]]
    anchors = np.tile(np.arange(n), per_anchor)
    c = inverse[anchors]
    # Positive: uniform over the anchor's class minus the anchor itself.
    j = rng.integers(0, sizes[c] - 1)
    j = j + (j >= rank_in_class[anchors])
    positives = order[start[c] + j]
    # Negative: uniform over the images outside the anchor's class.
    k = rng.integers(0, n - sizes[c])
    k = k + (k >= start[c]) * sizes[c]
    negatives = order[k]
    return np.stack([anchors, positives, negatives], axis=1).astype(np.int64)


class ClassBalancedBatchSampler(ResumableBatches):
    """Batches of ``classes_per_batch`` classes x ``images_per_class`` images, seeded per epoch.

    Each epoch shuffles every class's images and walks through them, so all
    images are seen about once per epoch; classes with fewer images than
    ``images_per_class`` are sampled with replacement. Call :meth:`set_epoch`
    to change the draw (Lightning does not do it for batch samplers).
    """

    def __init__(self, labels: np.ndarray, batch_size: int, images_per_class: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError("class-balanced batches need single-label class ids; use data.sampling=triplets "
                             "for multi-label data")
        if batch_size % images_per_class:
            raise ValueError(f"batch_size {batch_size} is not a multiple of images_per_class {images_per_class}")
        self.classes = np.unique(labels)
        self.members = [np.flatnonzero(labels == c) for c in self.classes]
        self.k = images_per_class
        self.p = batch_size // images_per_class
        if self.p > len(self.classes):
            raise DataError(f"{self.p} classes per batch requested but the training set has {len(self.classes)}")
        self.seed = seed
        self.epoch = 0
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0
        total = sum(len(m) for m in self.members)
        self.num_batches = max(1, total // batch_size // world_size)

    def __iter__(self) -> Iterator[List[int]]:
        rng = np.random.default_rng([self.seed, self.epoch])
        pools = [list(rng.permutation(m)) for m in self.members]
        batches = []
        for _ in range(self.num_batches * self.world_size):
            chosen = rng.choice(len(self.classes), size=self.p, replace=False)
            batch: List[int] = []
            for c in chosen:
                if len(pools[c]) < self.k:
                    # Refill with a fresh permutation, leaving out images still waiting in the pool so a
                    # batch never repeats an image (unless the class has fewer than k images).
                    waiting = set(pools[c])
                    refill = [i for i in rng.permutation(self.members[c]) if i not in waiting]
                    pools[c].extend(refill)
                    while len(pools[c]) < self.k:  # class smaller than k: sample with replacement
                        pools[c].extend(rng.permutation(self.members[c]))
                batch.extend(int(i) for i in pools[c][: self.k])
                del pools[c][: self.k]
            batches.append(batch)
        # Each rank takes a disjoint share of the epoch's batches.
        start, self.start_batch = self.start_batch, 0
        yield from batches[self.rank :: self.world_size][start:]
