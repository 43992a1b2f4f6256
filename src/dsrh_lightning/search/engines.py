"""Exact Hamming search engines: the project's torch engine and faiss binary indexes.

Search ranks by ``(Hamming distance, database index)``, the same rule as
:mod:`dsrh_lightning.metrics`. faiss is used when installed (flat; multi-index hashing
for very large databases with a fallback that keeps the result exact).
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch

from ..metrics.codes import hamming_distance
from .codes_file import CodesFileError, CodesIndex

__all__ = ["search", "search_torch", "search_faiss", "faiss_available", "MULTIHASH_MIN_DATABASE",
           "MULTIHASH_MIN_BITS"]

# faiss multi-index hashing pays off only for large databases of long codes.
MULTIHASH_MIN_DATABASE = 2_000_000
MULTIHASH_MIN_BITS = 32


def _check_k(k: int, nd: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    if nd == 0:  # faiss would fail with a bare AssertionError
        raise ValueError("the database is empty (0 codes); nothing to search")
    return int(min(k, nd))


def search_torch(q_bits, db_bits, k: int, db_chunk: int = 1 << 16) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` by ``(Hamming distance, database index)`` with the project's engine.

    Args:
        q_bits: ``(nq, bits)`` {0,1} queries; db_bits: ``(nd, bits)`` {0,1} database.

    Returns:
        ``(distances, indices)``, both ``(nq, min(k, nd))`` int64, best first.
    """
    q = torch.as_tensor(np.asarray(q_bits, dtype=np.uint8))
    db = torch.as_tensor(np.asarray(db_bits, dtype=np.uint8))
    nd = db.shape[0]
    k = _check_k(k, nd)
    best = torch.empty(q.shape[0], 0, dtype=torch.int64)
    for d0 in range(0, nd, db_chunk):
        dist = hamming_distance(q, db[d0:d0 + db_chunk]).to(torch.int64)
        # a unique key per item makes top-k independent of the selection algorithm
        keys = dist * nd + torch.arange(d0, d0 + dist.shape[1], dtype=torch.int64)
        cand = torch.cat([best, keys], 1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    return (best // nd).numpy(), (best % nd).numpy()


def faiss_available() -> bool:
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _stable_from_range(lims, dist, idx, nq: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
    out_d = np.empty((nq, k), dtype=np.int64)
    out_i = np.empty((nq, k), dtype=np.int64)
    for r in range(nq):
        d, i = dist[lims[r]:lims[r + 1]].astype(np.int64), idx[lims[r]:lims[r + 1]].astype(np.int64)
        order = np.lexsort((i, d))[:k]
        if len(order) < k:  # cannot happen for an exact range at the k-th distance
            raise RuntimeError(f"faiss range search returned {len(order)} < {k} items for query {r}")
        out_d[r], out_i[r] = d[order], i[order]
    return out_d, out_i


def _range_into(index, q_packed, rows, t: int, k: int, out_d, out_i, rows_per_call: int = 64) -> None:
    """Every item within distance ``t`` of each query in ``rows`` (a range search is strict:
    ``distance < t + 1``), sorted by (distance, index), first ``k`` written to ``out_*``.
    Queries go in small groups so that large tie groups stay bounded in memory."""
    for r0 in range(0, len(rows), rows_per_call):
        rr = rows[r0:r0 + rows_per_call]
        lims, dist, idx = index.range_search(q_packed[rr], t + 1)
        out_d[rr], out_i[rr] = _stable_from_range(lims, dist, idx, len(rr), k)


def search_faiss(q_bits, db_packed: np.ndarray, bits: int, k: int, multihash: Optional[bool] = None,
                 nhash: Optional[int] = None, nflip: int = 1, stats: Optional[dict] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` by ``(Hamming distance, database index)`` with faiss binary indexes.

    faiss's k-NN search may order ties differently and cut a tie group at the k-th
    distance anywhere, so it only finds the k-th distance ``t``; a range search then
    returns every item at distance ``<= t`` and they are sorted by ``(distance, index)``.

    With ``multihash`` (default: for databases of at least ``MULTIHASH_MIN_DATABASE``
    codes of ``MULTIHASH_MIN_BITS`` bits or more), ``IndexBinaryMultiHash`` with
    ``nhash`` tables and ``nflip`` flips finds every item within distance
    ``R = nhash * (nflip + 1) - 1`` (pigeonhole). A query whose k-th candidate lies
    within ``R`` is exact that way; the others are searched with the flat index.
    ``stats``, when given, receives the number of queries each index answered.
    """
    faiss_available()
    import faiss

    q_packed = np.ascontiguousarray(np.packbits(np.asarray(q_bits, dtype=np.uint8), axis=1))
    db_packed = np.ascontiguousarray(db_packed, dtype=np.uint8)
    if q_packed.shape[1] != db_packed.shape[1] or np.asarray(q_bits).shape[1] != bits:
        raise ValueError(f"bit widths differ: queries have {np.asarray(q_bits).shape[1]} bits, the database {bits}")
    nq, nd = q_packed.shape[0], db_packed.shape[0]
    k = _check_k(k, nd)
    d = 8 * db_packed.shape[1]  # zero padding bits add no distance
    if multihash is None:
        multihash = nd >= MULTIHASH_MIN_DATABASE and bits >= MULTIHASH_MIN_BITS
    out_d = np.empty((nq, k), dtype=np.int64)
    out_i = np.empty((nq, k), dtype=np.int64)
    todo = np.arange(nq)
    if multihash:
        nhash = nhash or max(1, bits // 16)
        b = bits // nhash
        if b < 1:
            raise ValueError(f"nhash={nhash} is larger than the {bits} bits")
        mih = faiss.IndexBinaryMultiHash(d, nhash, b)
        mih.nflip = nflip
        mih.add(db_packed)
        guaranteed = nhash * (nflip + 1) - 1
        D, _ = mih.search(q_packed, k)
        kth = D[:, k - 1].astype(np.int64)
        ok = (kth >= 0) & (kth <= guaranteed)  # -1: fewer than k candidates found
        if ok.any():
            sel = np.flatnonzero(ok)
            # one radius per call; group queries by their k-th distance
            for t in np.unique(kth[sel]):
                _range_into(mih, q_packed, sel[kth[sel] == t], int(t), k, out_d, out_i)
        todo = np.flatnonzero(~ok)
    if stats is not None:
        stats.update(multihash_queries=int(nq - len(todo)), flat_queries=int(len(todo)))
    if len(todo):
        flat = faiss.IndexBinaryFlat(d)
        flat.add(db_packed)
        D, _ = flat.search(q_packed[todo], k)
        kth = D[:, k - 1].astype(np.int64)
        for t in np.unique(kth):
            _range_into(flat, q_packed, todo[kth == t], int(t), k, out_d, out_i)
    return out_d, out_i


def search(q_bits, index: CodesIndex, k: int = 10, engine: str = "auto") -> Tuple[np.ndarray, np.ndarray, str]:
    """Top ``k`` of ``index`` for each query: ``(distances, indices, engine used)``."""
    if engine not in ("auto", "faiss", "torch"):
        raise ValueError(f"engine must be auto, faiss or torch, got {engine!r}")
    if len(index) == 0:
        raise CodesFileError(index.source or "index", "the index is empty (0 codes); nothing to search")
    q_bits = np.asarray(q_bits, dtype=np.uint8)
    if q_bits.ndim != 2 or q_bits.shape[1] != index.bits:
        raise ValueError(f"bit widths differ: queries have {q_bits.shape[-1]} bits, the index has {index.bits}")
    if engine == "faiss" and not faiss_available():
        raise ValueError("--engine faiss: faiss is not installed (pip install faiss-cpu), use --engine torch")
    if engine == "auto":
        engine = "faiss" if faiss_available() else "torch"
    if engine == "faiss":
        d, i = search_faiss(q_bits, index.packed, index.bits, k)
    else:
        d, i = search_torch(q_bits, index.unpacked(), k)
    return d, i, engine
