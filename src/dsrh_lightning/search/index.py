"""A codes index opened for search from Python: one codes file or a sharded index folder.

>>> index = Index("db_codes/")            # or "db.npz"
>>> result = index.search(codes, k=10)    # codes: packed (n, ceil(bits/8)) uint8 or (n, bits) {0, 1}
>>> result.ids[0], result.distances[0]

Results are exact and ranked by ``(Hamming distance, index position)``, the rule of the metrics and of
``dsrh search`` (:func:`dsrh_lightning.search.engines.search`, which reads a sharded index a block at a
time).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Index", "SearchResult", "as_bits"]


@dataclass
class SearchResult:
    """Top ``k`` per query: ``distances``, ``indices`` (positions in the index) ``(nq, k)`` int64, ``ids``
    ``(nq, k)`` strings and ``labels`` (``(nq, k, ...)`` or None)."""

    distances: np.ndarray
    indices: np.ndarray
    ids: np.ndarray
    labels: Optional[np.ndarray] = None


def as_bits(codes, bits: int) -> np.ndarray:
    """``(n, bits)`` {0,1} uint8 from packed ``(n, ceil(bits/8))`` uint8 or unpacked ``(n, bits)`` codes."""
    if hasattr(codes, "detach"):
        codes = codes.detach().cpu().numpy()
    arr = np.asarray(codes)
    if arr.ndim == 1:
        arr = arr[None]
    width = (bits + 7) // 8
    if arr.ndim == 2 and arr.shape[1] == bits and np.isin(arr, (0, 1)).all():
        return arr.astype(np.uint8)
    if arr.ndim == 2 and arr.shape[1] == width and arr.dtype == np.uint8:
        return np.unpackbits(arr, axis=1, count=bits)
    raise ValueError(f"codes must be packed (n, {width}) uint8 or unpacked (n, {bits}) in {{0, 1}} for a "
                     f"{bits}-bit index; got {arr.dtype} {arr.shape}")


class Index:
    """An opened codes index (``dsrh index`` output); :meth:`search` finds the nearest codes."""

    def __init__(self, path, keep_codes: bool = True) -> None:
        """``keep_codes``: keep a sharded index's codes in memory after the first search, so later searches
        neither re-read nor re-check the shards (False for an index larger than memory)."""
        from .shards import open_codes

        self.path = Path(path)
        self.codes = open_codes(self.path, keep_codes=keep_codes)
        self.bits = int(self.codes.bits)
        self.weights_hash = self.codes.weights_hash
        self.checkpoint = self.codes.checkpoint

    def __len__(self) -> int:
        return len(self.codes)

    def __repr__(self) -> str:
        return f"Index({str(self.path)!r}, {len(self)} codes of {self.bits} bits)"

    def lookup(self, indices):
        """``(ids, labels or None)`` of index positions ``indices`` (any shape)."""
        return self.codes.take(np.asarray(indices, dtype=np.int64))

    def search(self, codes, k: int = 10, engine: str = "auto") -> SearchResult:
        """Exact top ``k`` of every query code (packed or unpacked; one code or ``(nq, ...)``)."""
        from .engines import search

        q = as_bits(codes, self.bits)
        d, i, _ = search(q, self.codes, k, engine)  # a sharded index is read a block at a time
        ids, labels = self.lookup(i)
        return SearchResult(np.asarray(d, dtype=np.int64), np.asarray(i, dtype=np.int64), ids, labels)
