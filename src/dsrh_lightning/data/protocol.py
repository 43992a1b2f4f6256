"""Protocol splits: query / train / validation / database index sets, seeded and saved.

The paper protocol for CIFAR-10 (Yao et al. 2016): 1,000 queries (100 per class)
drawn from all 60,000 images, the other 59,000 form the database, and 5,000
training images (500 per class) are drawn from the database. We also hold out
validation queries from the database *outside* the training images, so model
selection never looks at the test queries; they are ranked against a seeded
subset of the database that excludes them.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from ..errors import DsrhError
from ..files import save_npz

__all__ = [
    "SplitError",
    "Split", "SPLIT_KEYS", "make_single_label_split", "make_multilabel_split", "split_from_lists",
    "split_fingerprint", "load_or_make_split",
]

SPLIT_KEYS = ("query", "database", "train", "val", "val_database")


class SplitError(DsrhError, ValueError):
    """The protocol split cannot be made: too few images per class, overlapping lists, a bad split file."""


@dataclass
class Split:
    """Index arrays into a :class:`~dsrh_lightning.data.sources.Source` (int64).

    ``query``, ``train`` and ``val`` are sorted. ``database`` and ``val_database`` are in a
    seeded random order (see :func:`shuffle_databases`): evaluation breaks Hamming ties by
    database position, and a source stored by class (``cifar10.npz`` is, and many list
    files are) would otherwise leak labels through the tie order.
    """

    query: np.ndarray
    database: np.ndarray
    train: np.ndarray
    val: np.ndarray
    val_database: np.ndarray

    def as_dict(self) -> Dict[str, np.ndarray]:
        return {k: getattr(self, k) for k in SPLIT_KEYS}

    def summary(self) -> str:
        return ", ".join(f"{k}={len(getattr(self, k))}" for k in SPLIT_KEYS)


def _per_class_draw(pool: np.ndarray, labels: np.ndarray, per_class: int, rng: np.random.Generator, what: str,
                    class_names) -> np.ndarray:
    chosen = []
    for c in range(len(class_names)):
        members = pool[labels[pool] == c]
        if len(members) < per_class:
            raise SplitError(
                f"{what}: class {c} ({class_names[c]}) has {len(members)} images available, "
                f"{per_class} needed; lower the per-class count in data.protocol"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.empty(0, np.int64)


def make_single_label_split(labels: np.ndarray, class_names, query_per_class: int, train_per_class: int,
                            val_per_class: int, val_database_size: int, seed: int) -> Split:
    """Seeded single-label protocol split.

    Args:
        labels: ``(n,)`` class ids in ``[0, len(class_names))``.

    Returns:
        query (``query_per_class`` per class from all images), database (the rest),
        train (``train_per_class`` per class from the database), val
        (``val_per_class`` per class from database minus train) and val_database
        (a random subset of database minus val, ``val_database_size`` items or all).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"single-label split needs 1-D class ids, got shape {labels.shape}")
    counts = np.bincount(labels, minlength=len(class_names))
    empty = [class_names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise SplitError(f"classes with no image: {empty}; every class needs images for the per-class protocol")
    return _draw_split(_per_class_draw, labels, class_names, query_per_class, train_per_class, val_per_class,
                       val_database_size, seed)


def _per_concept_draw(pool: np.ndarray, labels: np.ndarray, per_concept: int, rng: np.random.Generator,
                      what: str, class_names) -> np.ndarray:
    """For each concept in turn, draw ``per_concept`` not-yet-drawn images carrying it."""
    taken = np.zeros(len(labels), dtype=bool)
    chosen = []
    for c in range(labels.shape[1]):
        members = pool[(labels[pool, c] == 1) & ~taken[pool]]
        if len(members) < per_concept:
            raise SplitError(
                f"{what}: concept {c} ({class_names[c]}) has {len(members)} images left, {per_concept} needed; "
                "lower the per-class count in data.protocol"
            )
        pick = rng.choice(members, size=per_concept, replace=False)
        taken[pick] = True
        chosen.append(pick)
    return np.sort(np.concatenate(chosen))


def _val_sets(database: np.ndarray, train: np.ndarray, labels: np.ndarray, class_names, val_per_class: int,
              val_database_size: int, rng: np.random.Generator):
    rest = np.setdiff1d(database, train)
    draw = _per_concept_draw if labels.ndim == 2 else _per_class_draw
    val = draw(rest, labels, val_per_class, rng, "validation set", class_names) if val_per_class else \
        np.empty(0, np.int64)
    val_pool = np.setdiff1d(database, val)
    if val_database_size and val_database_size < len(val_pool):
        return val, np.sort(rng.choice(val_pool, size=val_database_size, replace=False))
    return val, val_pool


# Bumped when the meaning of a cached split file changes (v2: databases in seeded random order).
SPLIT_FORMAT = 2


def shuffle_databases(split: Split, seed: int) -> Split:
    """Put ``database`` and ``val_database`` in a seeded random order (their tie-break order).

    The permutation comes from its own stream (``[seed, 7]``), so it does not change which
    images are drawn for the other sets.
    """
    rng = np.random.default_rng([seed, 7])
    split.database = rng.permutation(np.sort(split.database))
    split.val_database = rng.permutation(np.sort(split.val_database))
    return split


def _draw_split(draw, labels, class_names, query_per_class, train_per_class, val_per_class, val_database_size,
                seed) -> Split:
    """Queries from all images, database = the rest, training images from the database, then validation."""
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    query = draw(everything, labels, query_per_class, rng, "query set", class_names)
    database = np.setdiff1d(everything, query)
    train = draw(database, labels, train_per_class, rng, "training set", class_names)
    val, val_database = _val_sets(database, train, labels, class_names, val_per_class, val_database_size, rng)
    return shuffle_databases(Split(query, database, train, val, val_database), seed)


def make_multilabel_split(labels: np.ndarray, class_names, query_per_class: int, train_per_class: int,
                          val_per_class: int, val_database_size: int, seed: int) -> Split:
    """Seeded multi-label protocol split (NUS-WIDE-21: 100 queries and 500 training images per concept).

    Args:
        labels: ``(n, c)`` multi-hot; every image needs at least one label.

    For each concept in turn, ``query_per_class`` images carrying it are drawn
    from the images not drawn yet (so the query set has ``c * query_per_class``
    distinct images); the database is the rest; training images are drawn the
    same way from the database, then validation queries from the database minus
    the training images.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"multi-label split needs (n, c) multi-hot labels, got shape {labels.shape}")
    unlabelled = np.flatnonzero(labels.sum(1) == 0)
    if len(unlabelled):
        raise SplitError(f"{len(unlabelled)} image(s) have no label (first: row {unlabelled[0]}); "
                         "remove them before splitting")
    return _draw_split(_per_concept_draw, labels, class_names, query_per_class, train_per_class, val_per_class,
                       val_database_size, seed)


def split_from_lists(query: np.ndarray, database: np.ndarray, train: np.ndarray, labels: np.ndarray,
                     class_names, val_per_class: int, val_database_size: int, seed: int) -> Split:
    """Split given by the user's lists; validation queries are carved from database minus train.

    ``train`` must lie inside the database (the usual convention) or be disjoint
    from the queries; queries and database must not overlap.
    """
    overlap = np.intersect1d(query, database)
    if len(overlap):
        raise SplitError(f"{len(overlap)} image(s) are both queries and database items; the query list and the "
                         "database list must be disjoint")
    if len(np.intersect1d(query, train)):
        raise SplitError("some training images are also queries; the train and query lists must be disjoint")
    rng = np.random.default_rng(seed)
    val, val_database = _val_sets(database, train, labels, class_names, val_per_class, val_database_size, rng)
    return shuffle_databases(Split(np.sort(query), np.sort(database), np.sort(train), val, val_database), seed)


def split_fingerprint(dataset: str, labels: np.ndarray, params: dict) -> str:
    """Short hash of the data set's labels and the protocol parameters."""
    h = hashlib.sha256()
    h.update(dataset.encode())
    h.update(np.ascontiguousarray(labels).tobytes())
    h.update(json.dumps(dict(params, split_format=SPLIT_FORMAT), sort_keys=True).encode())
    return h.hexdigest()[:12]


def load_or_make_split(make, dataset: str, labels: np.ndarray, params: dict, split_dir: Optional[Path]) -> Split:
    """Load ``<split_dir>/<dataset>-<fingerprint>.npz`` if present, else call ``make()`` and save it.

    Caching the split on disk keeps runs reproducible even if a future numpy
    changes its random streams.
    """
    fp = split_fingerprint(dataset, labels, params)
    path = Path(split_dir) / f"{dataset}-{fp}.npz" if split_dir else None
    if path is not None and path.is_file():
        with np.load(path) as data:
            missing = [k for k in SPLIT_KEYS if k not in data.files]
            if missing:
                raise SplitError(f"{path}: split file lacks {missing}; delete it to regenerate")
            return Split(**{k: data[k].astype(np.int64) for k in SPLIT_KEYS})
    split = make()
    if path is not None:
        save_split(split, path, params)
    return split


def save_split(split: Split, path: Path, params: Optional[dict] = None) -> None:
    """Write the split to ``path`` atomically (a failed write leaves the previous file as it was)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_npz(path, compressed=True, params=json.dumps(params or {}, sort_keys=True), **split.as_dict())
