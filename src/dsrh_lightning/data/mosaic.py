"""A multi-label data set from real pixels: mosaics of CIFAR-10 images (``dataset=cifar10_multilabel``).

Each image is a ``grid x grid`` mosaic of real CIFAR-10 images (32-px tiles, so 64 px for the default 2 x 2);
its labels are the set of classes that appear in it. The number of distinct classes per image follows
NUS-WIDE-21's label-count distribution (:data:`NUSWIDE21_LABEL_COUNTS`, measured on the real lists in
``shared/data/nuswide21/``), capped at ``grid * grid`` tiles and 10 classes. Every CIFAR-10 image is used as a
tile at most once in the whole data set, so no tile can appear in both a query and a database image, whatever
the split. Built deterministically from a seed; 60,000 images give 15,000 mosaics of 4 tiles (label counts
1-3 as in NUS-WIDE-21, 4 or more folded into 4).

It is a proxy for NUS-WIDE's multi-label retrieval, with limits: 10 classes instead of 21, tiles that do not
interact as objects in a photo do, and a database of thousands rather than 193,734 images.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from ..errors import DataError
from .sources import Source

__all__ = ["NUSWIDE21_LABEL_COUNTS", "make_mosaics", "label_count_distribution"]

# Fraction of NUS-WIDE-21 images (train.txt + test.txt, 12,600 lines) carrying 1, 2, ..., 10 of the 21 concepts.
NUSWIDE21_LABEL_COUNTS = (0.22167, 0.24540, 0.20500, 0.14889, 0.09500, 0.05659, 0.02063, 0.00579, 0.00095, 0.00008)


def label_count_distribution(labels: np.ndarray) -> np.ndarray:
    """Fraction of images carrying 1, 2, ... labels: ``(max_count,)`` from ``(n, c)`` multi-hot ``labels``."""
    counts = np.asarray(labels).sum(1).astype(np.int64)
    return np.bincount(counts, minlength=counts.max() + 1)[1:] / len(counts)


def _target_counts(grid: int, num_classes: int) -> np.ndarray:
    """NUS-WIDE-21's label-count distribution over 1..min(grid^2, classes) labels (the tail folded into the cap)."""
    cap = min(grid * grid, num_classes, len(NUSWIDE21_LABEL_COUNTS))
    p = np.array(NUSWIDE21_LABEL_COUNTS[:cap], dtype=np.float64)
    p[-1] += sum(NUSWIDE21_LABEL_COUNTS[cap:])
    return p / p.sum()


def make_mosaics(images: np.ndarray, labels: np.ndarray, class_names: Sequence[str], grid: int = 2,
                 seed: int = 0, count: Optional[int] = None, return_tiles: bool = False):
    """Tile single-label images into multi-label mosaics.

    Args:
        images: ``(n, s, s, 3)`` uint8 tiles.
        labels: ``(n,)`` class ids in ``[0, len(class_names))``.
        grid: tiles per side; a mosaic is ``(grid * s, grid * s, 3)``.
        seed: everything (label counts, classes, tiles, positions) is drawn from it.
        count: mosaics to build (default: as many as the tiles allow, ``n // grid^2``).

    Returns:
        :class:`Source` named ``cifar10_multilabel`` with ``(m, grid*s, grid*s, 3)`` uint8 images and
        ``(m, c)`` int64 multi-hot labels; each input image is used in at most one mosaic. With
        ``return_tiles``, also the ``(m, grid^2)`` input indices of each mosaic's tiles (row-major).
    """
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int64)
    if images.ndim != 4 or images.shape[1] != images.shape[2] or images.dtype != np.uint8:
        raise ValueError(f"mosaic tiles must be uint8 (n, s, s, 3), got {images.dtype} {images.shape}")
    c, per = len(class_names), grid * grid
    if grid < 1 or c < 2:
        raise ValueError(f"mosaics need grid >= 1 and >= 2 classes, got grid={grid}, {c} classes")
    if labels.shape != (len(images),):
        raise ValueError(f"mosaic labels must be one class id per tile, shape ({len(images)},); got {labels.shape}")
    outside = np.flatnonzero((labels < 0) | (labels >= c))
    if len(outside):
        raise ValueError(f"mosaic labels must be class ids in [0, {c}) ({c} class names); {len(outside)} are not, "
                         f"e.g. label {labels[outside[0]]} of tile {outside[0]}")
    most = len(images) // per
    count = most if count is None else int(count)
    if not 0 < count <= most:
        raise DataError(f"cifar10_multilabel: {count} mosaics of {per} tiles need {count * per} images; "
                         f"{len(images)} are available (at most {most} mosaics)")
    rng = np.random.default_rng(seed)
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in range(c)]
    p = _target_counts(grid, c)
    size = images.shape[1]
    out = np.empty((count, grid * size, grid * size, 3), np.uint8)
    multi_hot = np.zeros((count, c), np.int64)
    tile_ids = np.empty((count, per), np.int64)
    for m in range(count):
        left = np.array([len(q) for q in pools], dtype=np.float64)
        available = np.flatnonzero(left > 0)
        n_labels = min(int(rng.choice(len(p), p=p)) + 1, len(available))
        # Classes with more tiles left are likelier, which keeps every class in use until the tiles run out.
        chosen = rng.choice(available, size=n_labels, replace=False, p=left[available] / left[available].sum())
        tiles = list(chosen)  # one tile of each chosen class, the rest shared among them by what is left
        for _ in range(per - n_labels):
            room = np.array([len(pools[k]) - tiles.count(k) for k in chosen], dtype=np.float64)
            if room.sum() <= 0:  # the chosen classes ran out of tiles (only near the end): add a class
                spare = [k for k in range(c) if k not in chosen and len(pools[k]) > 0]
                if not spare:  # every tile is counted above, so this is not expected: say so rather than crash
                    raise DataError(f"cifar10_multilabel: no tiles left for mosaic {m + 1} of {count}; build "
                                     f"fewer mosaics (count=, at most {m})")
                chosen = np.append(chosen, spare[int(rng.integers(len(spare)))])
                tiles.append(chosen[-1])
                continue
            tiles.append(chosen[int(rng.choice(len(chosen), p=room / room.sum()))])
        rng.shuffle(tiles)
        for pos, k in enumerate(tiles):
            r, col = divmod(pos, grid)
            tile_ids[m, pos] = pools[k].pop()
            out[m, r * size:(r + 1) * size, col * size:(col + 1) * size] = images[tile_ids[m, pos]]
        multi_hot[m, chosen] = 1
    source = Source(out, multi_hot, tuple(class_names), "cifar10_multilabel")
    return (source, tile_ids) if return_tiles else source
