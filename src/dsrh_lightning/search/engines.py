"""Exact Hamming search engines: a numba scan, the project's torch engine and faiss binary indexes.

Search ranks by ``(Hamming distance, database index)``, the same rule as
:mod:`dsrh_lightning.metrics`. :func:`search` streams over the database a block at a time (a
codes file is one block, a sharded index one block per shard), keeps each query's best ``k``, and
merges; memory is the database block plus ``O(queries x k)``, never ``queries x database``.

Engines:

* ``numba`` (default): a popcount scan over codes packed into ``uint64`` words. Every item gets the
  key ``distance << 40 | index``, unique per item, so "better" is one integer comparison and the
  order of ties cannot depend on the scan order. Each query keeps a max-heap of its ``k`` smallest
  keys; an item is looked at further only when its distance is at most the heap's worst. Codes of
  at most 64 bits are compared with four queries per loaded database word. Many queries: the
  database is cut into cache-sized blocks and groups of queries of a block run in parallel. Few
  queries: the database is cut into one part per thread, each with its own heaps, merged at the end.
* ``faiss``: ``IndexBinaryFlat`` (multi-index hashing for very large databases), made exact on ties
  with a range search at the k-th distance (see :func:`search_faiss`).
* ``torch``: distances of database chunks by a matrix product, merged with ``topk`` on the same keys.
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import numpy as np
import torch

from ..errors import InputError
from ..metrics.codes import hamming_distance
from ..metrics.engine_numba import HAVE_NUMBA
from .codes_file import CodesFileError, CodesIndex
from .shards import ShardedCodes

__all__ = ["search", "search_numba", "search_torch", "search_faiss", "faiss_available", "ENGINES",
           "MULTIHASH_MIN_DATABASE", "MULTIHASH_MIN_BITS", "MAX_ITEMS", "packed_words", "distance_counts",
           "search_with_ties"]

ENGINES = ("auto", "numba", "faiss", "torch")
#: Keys are ``distance << KEY_SHIFT | index``: indices below ``MAX_ITEMS``, distances below ``2 ** 23``.
KEY_SHIFT = 40
MAX_ITEMS = 1 << KEY_SHIFT
EMPTY_KEY = np.iinfo(np.int64).max
#: Database rows per block of the many-queries scan (8 bytes a row for <= 64 bits: 256 KiB, in L2).
SCAN_BLOCK = 1 << 15
#: Below this many (query, item) distances a block is scanned by one thread: starting threads costs more.
PARALLEL_MIN_WORK = 1 << 18
#: Shards of a sharded index are joined into blocks of at least this many codes before a scan (32 MiB of
#: words at 64 bits): the threads share large blocks, and memory stays one block plus the results.
COALESCE_ROWS = 1 << 22

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


def packed_words(packed: np.ndarray) -> np.ndarray:
    """``(n, ceil(bits/8))`` uint8 packed codes as ``(n, ceil(bits/64))`` uint64 words (zero padded;
    a view when the width is already a whole number of words)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    n, nbytes = packed.shape
    words = max(1, -(-nbytes // 8))
    if nbytes != words * 8:
        padded = np.zeros((n, words * 8), dtype=np.uint8)
        padded[:, :nbytes] = packed
        packed = padded
    return packed.view(np.uint64).reshape(n, words)


if HAVE_NUMBA:
    from numba import get_num_threads, njit, prange

    from ..metrics.engine_numba import _popcount

    @njit(cache=True, inline="always")
    def _replace_top(h, key):
        """Max-heap ``h``: put ``key`` (smaller than the root) in the root's place and sift it down."""
        k = h.shape[0]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= k:
                break
            if c + 1 < k and h[c + 1] > h[c]:
                c += 1
            if h[c] <= key:
                break
            h[i] = h[c]
            i = c
        h[i] = key

    @njit(cache=True)
    def _scan_range(qw, dbw, qi, j0, j1, offset, h):
        """Query ``qi`` against database rows ``j0 .. j1-1`` (item number ``offset + j``) into heap ``h``."""
        W = dbw.shape[1]
        top = h[0]
        worst = top >> 40  # distance of the heap's worst key; huge while the heap has empty slots
        if W == 1:
            q0 = qw[qi, 0]
            for j in range(j0, j1):
                d = _popcount(q0 ^ dbw[j, 0])
                if d <= worst:
                    key = (d << 40) | (offset + j)
                    if key < top:
                        _replace_top(h, key)
                        top = h[0]
                        worst = top >> 40
        else:
            for j in range(j0, j1):
                d = 0
                for w in range(W):
                    d += _popcount(qw[qi, w] ^ dbw[j, w])
                if d <= worst:
                    key = (d << 40) | (offset + j)
                    if key < top:
                        _replace_top(h, key)
                        top = h[0]
                        worst = top >> 40

    @njit(cache=True)
    def _scan_four(qw, dbw, q0, j0, j1, offset, heaps):
        """Queries ``q0 .. q0+3`` of one-word codes against rows ``j0 .. j1-1``: each database word is loaded
        once for four queries (the same keys and heaps as :func:`_scan_range`, four at a time)."""
        h0 = heaps[q0]
        h1 = heaps[q0 + 1]
        h2 = heaps[q0 + 2]
        h3 = heaps[q0 + 3]
        a0 = qw[q0, 0]
        a1 = qw[q0 + 1, 0]
        a2 = qw[q0 + 2, 0]
        a3 = qw[q0 + 3, 0]
        w0 = h0[0] >> 40
        w1 = h1[0] >> 40
        w2 = h2[0] >> 40
        w3 = h3[0] >> 40
        for j in range(j0, j1):
            x = dbw[j, 0]
            d0 = _popcount(a0 ^ x)
            d1 = _popcount(a1 ^ x)
            d2 = _popcount(a2 ^ x)
            d3 = _popcount(a3 ^ x)
            if (d0 <= w0) | (d1 <= w1) | (d2 <= w2) | (d3 <= w3):  # rare once the heaps are full
                if d0 <= w0:
                    key = (d0 << 40) | (offset + j)
                    if key < h0[0]:
                        _replace_top(h0, key)
                        w0 = h0[0] >> 40
                if d1 <= w1:
                    key = (d1 << 40) | (offset + j)
                    if key < h1[0]:
                        _replace_top(h1, key)
                        w1 = h1[0] >> 40
                if d2 <= w2:
                    key = (d2 << 40) | (offset + j)
                    if key < h2[0]:
                        _replace_top(h2, key)
                        w2 = h2[0] >> 40
                if d3 <= w3:
                    key = (d3 << 40) | (offset + j)
                    if key < h3[0]:
                        _replace_top(h3, key)
                        w3 = h3[0] >> 40

    @njit(cache=True)
    def _scan_queries(qw, dbw, q_lo, q_hi, j0, j1, offset, heaps):
        """Queries ``q_lo .. q_hi-1`` against rows ``j0 .. j1-1`` into ``heaps`` ``(nq, k)``: four at a time
        for codes of at most 64 bits, the rest one by one."""
        qi = q_lo
        if dbw.shape[1] == 1:
            while qi + 4 <= q_hi:
                _scan_four(qw, dbw, qi, j0, j1, offset, heaps)
                qi += 4
        while qi < q_hi:
            _scan_range(qw, dbw, qi, j0, j1, offset, heaps[qi])
            qi += 1

    @njit(parallel=True, cache=True)
    def _scan_by_queries(qw, dbw, offset, heaps, block):
        """Many queries: database blocks in turn, groups of four queries of a block in parallel; heaps
        ``(1, nq, k)``."""
        n = dbw.shape[0]
        nq = qw.shape[0]
        groups = (nq + 3) // 4
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            for g in prange(groups):
                _scan_queries(qw, dbw, 4 * g, min(nq, 4 * g + 4), b0, b1, offset, heaps[0])

    @njit(parallel=True, cache=True)
    def _scan_by_parts(qw, dbw, offset, heaps, block):
        """Few queries: one part of the database per heap set ``heaps[p]`` (``(P, nq, k)``), in parallel."""
        n = dbw.shape[0]
        nq = qw.shape[0]
        P = heaps.shape[0]
        step = (n + P - 1) // P
        for p in prange(P):
            s = p * step
            e = min(n, s + step)
            for b0 in range(s, e, block):
                b1 = min(e, b0 + block)
                _scan_queries(qw, dbw, 0, nq, b0, b1, offset, heaps[p])

    @njit(cache=True)
    def _scan_serial(qw, dbw, offset, heaps, block):
        """One thread (small work, where starting threads costs more than it saves); heaps ``(P, nq, k)``,
        the first set used."""
        n = dbw.shape[0]
        for b0 in range(0, n, block):
            b1 = min(n, b0 + block)
            _scan_queries(qw, dbw, 0, qw.shape[0], b0, b1, offset, heaps[0])

    @njit(parallel=True, cache=True)
    def _count_by_parts(qw, dbw, counts):
        """``counts[p, q, d]`` += number of items at distance ``d`` from query ``q`` in part ``p``."""
        n = dbw.shape[0]
        W = dbw.shape[1]
        P = counts.shape[0]
        step = (n + P - 1) // P
        for p in prange(P):
            for qi in range(qw.shape[0]):
                for j in range(p * step, min(n, (p + 1) * step)):
                    d = 0
                    for w in range(W):
                        d += _popcount(qw[qi, w] ^ dbw[j, w])
                    counts[p, qi, d] += 1


class _NumbaTopK:
    """Streaming exact top ``k`` with the numba scan: :meth:`add` database blocks, then :meth:`result`."""

    def __init__(self, q_packed: np.ndarray, k: int, threads: Optional[int] = None) -> None:
        if not HAVE_NUMBA:
            raise ValueError("engine numba: numba is not installed (pip install numba), use engine torch or faiss")
        self.qw = packed_words(q_packed)
        threads = threads or get_num_threads()
        nq = len(self.qw)
        self.by_queries = -(-nq // 4) >= 2 * threads  # enough groups of four queries to keep threads busy
        parts = 1 if self.by_queries else threads
        self.heaps = np.full((parts, nq, k), EMPTY_KEY, dtype=np.int64)

    def add(self, offset: int, packed: np.ndarray) -> None:
        """Scan database rows ``offset ..``: ``packed`` uint8 codes, or uint64 words from :func:`packed_words`."""
        if not len(packed):
            return
        dbw = packed if packed.dtype == np.uint64 else packed_words(packed)
        if dbw.shape[1] != self.qw.shape[1]:
            raise ValueError(f"code widths differ: queries {self.qw.shape[1]} words, database {dbw.shape[1]}")
        if len(dbw) * len(self.qw) < PARALLEL_MIN_WORK:
            _scan_serial(self.qw, dbw, np.int64(offset), self.heaps, SCAN_BLOCK)
        elif self.by_queries:
            _scan_by_queries(self.qw, dbw, np.int64(offset), self.heaps, SCAN_BLOCK)
        else:
            parts = self.heaps.shape[0]
            block = max(1024, min(SCAN_BLOCK, -(-len(dbw) // parts)))
            _scan_by_parts(self.qw, dbw, np.int64(offset), self.heaps, block)

    def result(self) -> np.ndarray:
        """``(nq, k)`` keys, best first."""
        parts, nq, k = self.heaps.shape
        keys = self.heaps[0] if parts == 1 else self.heaps.transpose(1, 0, 2).reshape(nq, parts * k)
        return np.sort(keys, axis=1)[:, :k]


class _MergeTopK:
    """Streaming exact top ``k`` from per-block results ``(distances, local indices)`` of another engine."""

    def __init__(self, nq: int, k: int) -> None:
        self.k = k
        self.keys = np.full((nq, 0), EMPTY_KEY, dtype=np.int64)

    def add(self, offset: int, dist: np.ndarray, idx: np.ndarray) -> None:
        new = (dist.astype(np.int64) << KEY_SHIFT) | (idx.astype(np.int64) + offset)
        both = np.concatenate([self.keys, new], axis=1)
        self.keys = np.sort(both, axis=1)[:, :self.k]

    def result(self) -> np.ndarray:
        return self.keys


def _split_keys(keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    if (keys == EMPTY_KEY).any():  # cannot happen when k <= the database size
        raise RuntimeError("search kept an empty slot: fewer items than k were scanned")
    return keys >> KEY_SHIFT, keys & (MAX_ITEMS - 1)


def search_numba(q_bits, db: np.ndarray, k: int, threads: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` by ``(Hamming distance, database index)`` with the numba scan.

    Args:
        q_bits: ``(nq, bits)`` {0,1} queries.
        db: ``(nd, ceil(bits/8))`` uint8 ``np.packbits`` codes, or the same as ``(nd, ceil(bits/64))``
            uint64 words from :func:`packed_words` (prepared once, they spare each call the padding
            copy that widths other than a multiple of 64 bits need).
        threads: parts of the database scanned in parallel for few queries (default: numba's threads).

    Returns:
        ``(distances, indices)``, both ``(nq, min(k, nd))`` int64, best first.
    """
    q_bits = np.asarray(q_bits, dtype=np.uint8)
    db = np.asarray(db)
    if db.dtype != np.uint64:
        db = db.astype(np.uint8, copy=False)
    if q_bits.ndim != 2 or db.ndim != 2:
        raise ValueError(f"queries and database must be 2-D, got {q_bits.shape} and {db.shape}")
    per_row = -(-q_bits.shape[1] // 64) if db.dtype == np.uint64 else -(-q_bits.shape[1] // 8)
    if per_row != db.shape[1]:
        raise ValueError(f"bit widths differ: queries {q_bits.shape}, database {db.shape} {db.dtype}")
    k = _check_k(k, len(db))
    if len(db) > MAX_ITEMS:
        raise ValueError(f"the database has {len(db)} codes; the numba engine handles up to {MAX_ITEMS}")
    top = _NumbaTopK(np.packbits(q_bits, axis=1), k, threads)
    top.add(0, db)
    return _split_keys(top.result())


def _block_words(index, packed: np.ndarray) -> np.ndarray:
    """uint64 words of a block; an index whose codes stay in memory (a :class:`CodesIndex`, a
    :class:`ShardedCodes` with ``keep_codes``) keeps them too, so repeated searches pad its codes once."""
    if not (isinstance(index, CodesIndex) or getattr(index, "keep_codes", False)):
        return packed_words(packed)
    cached = index.__dict__.get("_words")
    if cached is None or cached[0] is not packed:
        cached = (packed, packed_words(packed))
        index.__dict__["_words"] = cached
    return cached[1]


_POPCOUNT8 = np.asarray([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def _block_counts(q_packed: np.ndarray, index, packed: np.ndarray, bits: int, chunk: Optional[int] = None
                  ) -> np.ndarray:
    """``(nq, bits + 1)`` numbers of items of one block at each distance from each query (without
    numba: ``chunk`` database rows at a time, by default as many as keep the arrays of a chunk near 16 MiB:
    the XOR and popcount byte tables, ``2 * nbytes`` per query-item pair, and the distances)."""
    nq = len(q_packed)
    if HAVE_NUMBA:
        parts = np.zeros((get_num_threads(), nq, bits + 1), dtype=np.int64)
        _count_by_parts(packed_words(q_packed), _block_words(index, packed), parts)
        return parts.sum(0)
    counts = np.zeros((nq, bits + 1), dtype=np.int64)
    dist_dtype = np.dtype(np.uint16 if bits < (1 << 16) else np.int64)  # holds every distance 0..bits
    per_pair = 2 * packed.shape[1] + dist_dtype.itemsize
    chunk = chunk or max(1, (1 << 24) // max(1, nq * per_pair))
    for c0 in range(0, len(packed), chunk):
        d = _POPCOUNT8[q_packed[:, None, :] ^ packed[None, c0:c0 + chunk, :]].sum(-1, dtype=dist_dtype)
        for r in range(nq):
            counts[r] += np.bincount(d[r], minlength=bits + 1)
    return counts


def distance_counts(q_bits, index: "AnyIndex") -> np.ndarray:
    """``(nq, bits + 1)`` int64: how many items of ``index`` lie at each Hamming distance from each query.

    With it a result at distance ``d`` is one of the tie group ranked ``counts[:d].sum() + 1`` to
    ``counts[:d + 1].sum()``. One scan over the index, a block at a time.
    """
    q_bits = np.asarray(q_bits, dtype=np.uint8)
    if q_bits.ndim != 2 or q_bits.shape[1] != index.bits:
        raise ValueError(f"bit widths differ: queries have {q_bits.shape[-1]} bits, the index has {index.bits}")
    q_packed = np.packbits(q_bits, axis=1)
    counts = np.zeros((len(q_bits), index.bits + 1), dtype=np.int64)
    for _, packed in index.blocks():
        counts += _block_counts(q_packed, index, packed, index.bits)
    return counts


AnyIndex = Union[CodesIndex, ShardedCodes]


def search(q_bits, index: AnyIndex, k: int = 10, engine: str = "auto") -> Tuple[np.ndarray, np.ndarray, str]:
    """Top ``k`` of ``index`` (a :class:`CodesIndex` or a :class:`ShardedCodes`) for each query:
    ``(distances, indices, engine used)``, ``(nq, min(k, len(index)))`` int64, best first.

    The database is read a block (shard) at a time; the result is the same whatever the engine
    and however the index is sharded. ``engine`` ``auto`` is numba when installed, else faiss when
    installed, else torch.
    """
    d, i, used, _ = _search_blocks(q_bits, index, k, engine, count=False)
    return d, i, used


def search_with_ties(q_bits, index: AnyIndex, k: int = 10, engine: str = "auto"
                     ) -> Tuple[np.ndarray, np.ndarray, str, np.ndarray]:
    """:func:`search` plus :func:`distance_counts` in the same pass over the index (each block is read
    once): ``(distances, indices, engine used, counts (nq, bits + 1))``."""
    return _search_blocks(q_bits, index, k, engine, count=True)


def _coalesce(blocks, min_rows: int):
    """Consecutive ``(offset, packed)`` blocks joined until each holds at least ``min_rows`` codes (the
    last may hold fewer), so that small shards are scanned by every thread, not one shard at a time."""
    pending, start, rows = [], 0, 0
    for offset, packed in blocks:
        if pending and offset != start + rows:  # not consecutive: pass on what is gathered so far
            yield start, pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending, rows = [], 0
        if not pending:
            start = offset
        pending.append(packed)
        rows += len(packed)
        if rows >= min_rows:
            yield start, pending[0] if len(pending) == 1 else np.concatenate(pending)
            pending, rows = [], 0
    if pending:
        yield start, pending[0] if len(pending) == 1 else np.concatenate(pending)


def _search_blocks(q_bits, index: AnyIndex, k: int, engine: str, count: bool):
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    nd = len(index)
    if nd == 0:
        raise CodesFileError(index.source or "index", "the index is empty (0 codes); nothing to search")
    if nd > MAX_ITEMS:
        raise InputError(f"the index has {nd} codes; search handles up to {MAX_ITEMS}")
    q_bits = np.asarray(q_bits, dtype=np.uint8)
    if q_bits.ndim != 2 or q_bits.shape[1] != index.bits:
        raise ValueError(f"bit widths differ: queries have {q_bits.shape[-1]} bits, the index has {index.bits}")
    if q_bits.size and not np.isin(q_bits, (0, 1)).all():
        raise ValueError("queries must be {0,1} codes")
    if engine == "faiss" and not faiss_available():
        raise InputError("--engine faiss: faiss is not installed (pip install faiss-cpu), use --engine numba or torch")
    if engine == "numba" and not HAVE_NUMBA:
        raise InputError("--engine numba: numba is not installed (pip install numba), use --engine torch")
    if engine == "auto":
        engine = "numba" if HAVE_NUMBA else ("faiss" if faiss_available() else "torch")
    k = _check_k(k, nd)
    q_packed = np.packbits(q_bits, axis=1)
    counts = np.zeros((len(q_bits), index.bits + 1), dtype=np.int64) if count else None
    top = _NumbaTopK(q_packed, k) if engine == "numba" else _MergeTopK(len(q_bits), k)
    blocks = index.blocks() if isinstance(index, CodesIndex) else _coalesce(index.blocks(), COALESCE_ROWS)
    for offset, packed in blocks:
        if engine == "numba":
            top.add(offset, _block_words(index, packed))
        else:
            kb = min(k, len(packed))
            if engine == "faiss":
                d, i = search_faiss(q_bits, packed, index.bits, kb)
            else:
                d, i = search_torch(q_bits, np.unpackbits(packed, axis=1, count=index.bits), kb)
            top.add(offset, d, i)
        if count:
            counts += _block_counts(q_packed, index, packed, index.bits)
    d, i = _split_keys(top.result())
    return d, i, engine, counts
