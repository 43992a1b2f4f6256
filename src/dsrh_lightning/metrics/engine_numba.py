"""Exact stable Hamming-ranking metrics with numba: two O(N) passes per query, no sort.

Used by :func:`~dsrh_lightning.metrics.retrieval.retrieval_metrics` for CPU inputs
with ``ties="stable"`` (``engine="auto"`` or ``"numba"``). The kernel runs in
parallel over queries (``prange``) and, per query:

1. **Pass 1** computes every Hamming distance ``d`` (popcount of XOR on codes
   packed into ``uint64`` words), the binary relevance ``rel`` (class id equality,
   or ``(q_mask & x_mask) != 0`` on labels packed into ``uint64`` bit masks) and
   stores ``2 d + rel`` in a per-thread scratch row of ``N`` bytes. It builds the
   per-distance histograms of all items and of relevant items (plus, when asked
   for, per-distance sums of the multilevel relevance ``r = popcount(q & x)`` and a
   histogram of ``r`` for the ideal DCG).
2. Exclusive prefix sums give, for each distance ``v``, the number of items and of
   relevant items ranked before the first item at distance ``v``.
3. **Pass 2** walks the database in index order with one counter per distance
   bucket. The counter of bucket ``v`` after item ``j`` is exactly ``j``'s 1-based
   position in the ``(distance, database index)`` ranking, and the relevant
   counter is the number of relevant items up to and including ``j``. The requested
   quantities (:mod:`.specs`: AP, hit counts, DCG, sums of ``r``, weighted AP, each
   at its own cut-off) accumulate from these, in float64. Items beyond the bucket
   that holds the largest cut-off are skipped.

Memory: the packed codes and labels plus one scratch row of ``N`` bytes (``uint16``
above 127 bits) per work chunk; never ``nq x N``.
"""

from __future__ import annotations

import math

import numpy as np

try:  # numba is optional: the torch engine works without it
    import numba
    from numba import njit, prange
    from numba.core import types as _nbtypes
    from numba.extending import intrinsic

    HAVE_NUMBA = True
except Exception:  # pragma: no cover - exercised only without numba
    HAVE_NUMBA = False

__all__ = ["HAVE_NUMBA", "QUANTITY_CODES", "pack_bits", "numba_retrieval_arrays"]

# The quantities the kernel computes (see :mod:`.specs`), by the integer code the kernel branches on.
Q_AP, Q_HITS, Q_DCG, Q_IDEAL_DCG, Q_GAIN_SUM, Q_WAP, Q_BALL_REL, Q_BALL_ITEMS = range(8)
QUANTITY_CODES = {"ap": Q_AP, "hits": Q_HITS, "dcg": Q_DCG, "ideal_dcg": Q_IDEAL_DCG, "gain_sum": Q_GAIN_SUM,
                  "wap": Q_WAP, "ball_rel": Q_BALL_REL, "ball_items": Q_BALL_ITEMS}


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a ``(n, k)`` 0/1 matrix into ``(n, ceil(k / 64))`` ``uint64`` words (zero padded)."""
    bits = np.ascontiguousarray(bits, dtype=np.uint8)
    n, k = bits.shape
    words = max(1, -(-k // 64))
    packed = np.packbits(bits, axis=1)
    out = np.zeros((n, words * 8), dtype=np.uint8)
    out[:, : packed.shape[1]] = packed
    return out.view(np.uint64).reshape(n, words)


if HAVE_NUMBA:

    @intrinsic
    def _popcount(typingctx, x):
        """LLVM ``ctpop`` on a 64-bit integer, as int64 (one ``popcnt`` where the CPU has it)."""
        if not isinstance(x, _nbtypes.Integer) or x.bitwidth != 64:
            return None

        def codegen(context, builder, signature, args):
            return builder.ctpop(args[0])

        return _nbtypes.int64(x), codegen

    @njit(cache=True, fastmath=False)
    def _query(i, data, work, req, setting, out, c):
        """One query: fill ``out`` row ``i`` (see :func:`_kernel` for the groups)."""
        qc, dc, ql, dl = data
        scr, h, rsum, rhist, nb, rb, rsb, pbuf, jbuf, acc, cnt = work
        kinds, cuts = req
        multi, k, k_max, need_rsum, need_rhist, want_r, do_pr = setting
        vals, rtot, pr_cnt, pr_rel = out
        nd = dc.shape[0]
        W = dc.shape[1]
        L = dl.shape[1]
        M = kinds.shape[0]
        # flat views: 1-D indexing is much faster in the hot loops than 2-D indexing
        dc1 = dc.ravel()
        dl1 = dl.ravel()
        V = k + 1
        h[:] = 0
        acc[:] = 0.0
        cnt[:] = 0
        if need_rsum:
            rsum[:] = 0
        if need_rhist:
            rhist[:] = 0
        # ---- pass 1: distances, relevance, histograms
        if W == 1 and not multi and not need_rsum and not need_rhist:
            q0 = qc[i, 0]
            lab = ql[i, 0]
            for j in range(nd):
                s = _popcount(q0 ^ dc1[j]) * 2
                if dl1[j] == lab:
                    s += 1
                scr[j] = s
                h[s] += 1
        elif W == 1 and multi and L == 1 and not need_rsum and not need_rhist:
            q0 = qc[i, 0]
            m0 = ql[i, 0]
            for j in range(nd):
                s = _popcount(q0 ^ dc1[j]) * 2
                if (dl1[j] & m0) != 0:
                    s += 1
                scr[j] = s
                h[s] += 1
        else:
            for j in range(nd):
                x = 0
                for w in range(W):
                    x += _popcount(qc[i, w] ^ dc1[j * W + w])
                if multi:
                    r = 0
                    for w in range(L):
                        r += _popcount(ql[i, w] & dl1[j * L + w])
                    rel = 1 if r > 0 else 0
                else:
                    rel = 1 if dl1[j] == ql[i, 0] else 0
                    r = rel
                s = 2 * x + rel
                scr[j] = s
                h[s] += 1
                if need_rsum:
                    rsum[x] += r
                if need_rhist:
                    rhist[r] += 1
        # ---- exclusive prefixes
        n_acc = 0
        r_acc = 0
        rs_acc = 0
        vcut = k
        found = False
        for v in range(V):
            cv = h[2 * v] + h[2 * v + 1]
            rv = h[2 * v + 1]
            nb[v] = n_acc
            rb[v] = r_acc
            if need_rsum:
                rsb[v] = rs_acc
                rs_acc += rsum[v]
            n_acc += cv
            r_acc += rv
            if do_pr:
                pr_cnt[c, v] += n_acc
                pr_rel[c, v] += r_acc
            if not found and n_acc >= k_max:
                vcut = v
                found = True
        rtot[i] = r_acc
        # items / relevant items within a Hamming radius (cumulative counts up to that distance)
        for u in range(M):
            kind = kinds[u]
            if kind == Q_BALL_REL or kind == Q_BALL_ITEMS:
                v = min(cuts[u], k)
                if kind == Q_BALL_REL:
                    vals[i, u] = rb[v] + h[2 * v + 1]
                else:
                    vals[i, u] = nb[v] + h[2 * v] + h[2 * v + 1]
        # ---- pass 2: walk in index order; bucket counters give stable positions
        m = 0
        if r_acc > 0:
            # 2a: the hot walk, branch-free: every item bumps its bucket counter (= its
            # stable position); the (position, index) slot is kept only for relevant items
            # up to the bucket that holds rank k_max
            lim = vcut
            for j in range(nd):
                s = scr[j]
                v = s >> 1
                p = nb[v] + 1
                nb[v] = p
                pbuf[m] = p
                jbuf[m] = j
                m += (s & 1) * np.int64(v <= lim)
        # 2b: quantities from the recorded relevant items (index order, not rank order; the
        # per-bucket relevant counters make the hit counts exact all the same)
        for t in range(m):
            pos = np.int64(pbuf[t])
            if pos > k_max:
                continue
            j = np.int64(jbuf[t])
            v = scr[j] >> 1
            rb[v] += 1
            hits = rb[v]
            r = 1
            if want_r and multi:
                r = 0
                for w in range(L):
                    r += _popcount(ql[i, w] & dl1[j * L + w])
            if need_rsum:
                rsb[v] += r
            for u in range(M):
                if pos > cuts[u]:
                    continue
                kind = kinds[u]
                if kind == Q_AP:
                    acc[u] += hits / pos
                    cnt[u] += 1
                elif kind == Q_HITS:
                    cnt[u] += 1
                elif kind == Q_DCG:
                    acc[u] += (2.0 ** r - 1.0) / math.log2(pos + 1.0)
                elif kind == Q_GAIN_SUM:
                    acc[u] += r
                elif kind == Q_WAP:
                    acc[u] += rsb[v] / pos
                    cnt[u] += 1
        for u in range(M):
            kind = kinds[u]
            if kind == Q_AP or kind == Q_WAP:
                vals[i, u] = acc[u] / cnt[u] if cnt[u] > 0 else 0.0
            elif kind == Q_HITS:
                vals[i, u] = cnt[u]
            elif kind == Q_DCG or kind == Q_GAIN_SUM:
                vals[i, u] = acc[u]
            elif kind == Q_IDEAL_DCG:
                # the whole database sorted by r (descending), first cuts[u] positions
                idcg = 0.0
                p = 0
                top = rhist.shape[0] - 1
                for val in range(top, 0, -1):
                    g = 2.0 ** val - 1.0
                    for _ in range(rhist[val]):
                        if p >= cuts[u]:
                            break
                        p += 1
                        idcg += g / math.log2(p + 1.0)
                    if p >= cuts[u]:
                        break
                vals[i, u] = idcg

    @njit(parallel=True, cache=True, fastmath=False)
    def _kernel(data, req, shape, flags, scratch):
        """All queries, in parallel over chunks of queries.

        Groups: ``data = (qc, dc, ql, dl)`` packed codes and labels; ``req = (kinds, cuts)`` ``(M,)`` int64
        quantity codes and cut-offs; ``shape = (k, nlevels)`` bits and label columns; ``flags = (multi,
        do_pr)``; ``scratch`` ``(nchunks, nd)`` one row per chunk. Returns ``(vals (nq, M) float64, rtot (nq,),
        pr_cnt (V,), pr_rel (V,))``.
        """
        qc, dc, ql, dl = data
        kinds, cuts = req
        k, nlevels = shape
        multi, do_pr = flags
        nq = qc.shape[0]
        M = kinds.shape[0]
        nchunks = scratch.shape[0]
        V = k + 1
        k_max = 1
        need_rsum = False
        need_rhist = False
        want_r = False
        for u in range(M):
            kind = kinds[u]
            if kind != Q_BALL_REL and kind != Q_BALL_ITEMS:
                k_max = max(k_max, cuts[u])
            need_rsum = need_rsum or kind == Q_WAP
            need_rhist = need_rhist or kind == Q_IDEAL_DCG
            want_r = want_r or kind == Q_DCG or kind == Q_GAIN_SUM or kind == Q_WAP
        setting = (multi, k, k_max, need_rsum, need_rhist, want_r, do_pr)
        vals = np.zeros((nq, M))
        rtot = np.zeros(nq, np.int64)
        pr_cnt = np.zeros((nchunks, V), np.int64)
        pr_rel = np.zeros((nchunks, V), np.int64)
        per = (nq + nchunks - 1) // nchunks
        for c in prange(nchunks):
            work = (scratch[c], np.zeros(2 * V, np.int64), np.zeros(V, np.int64), np.zeros(nlevels + 1, np.int64),
                    np.zeros(V, np.int64), np.zeros(V, np.int64), np.zeros(V, np.int64),
                    np.empty(dc.shape[0] + 1, np.int32), np.empty(dc.shape[0] + 1, np.int32),
                    np.zeros(M), np.zeros(M, np.int64))
            out = (vals, rtot, pr_cnt, pr_rel)
            for i in range(c * per, min(nq, (c + 1) * per)):
                _query(i, data, work, req, setting, out, c)
        return vals, rtot, pr_cnt.sum(0), pr_rel.sum(0)


def numba_retrieval_arrays(q_bits, db_bits, q_labels, db_labels, *, multi: bool, slots, pr_curve: bool,
                           chunks_per_thread: int = 16):
    """Per-query quantities from the numba kernel.

    Args:
        q_bits, db_bits: ``(nq, k)`` / ``(nd, k)`` uint8 {0,1} numpy arrays.
        q_labels, db_labels: ``(n,)`` non-negative class ids, or ``(n, c)`` 0/1 multi-hot.
        multi: multi-hot labels.
        slots: ``(quantity, cut-off)`` pairs (names of :data:`QUANTITY_CODES`); rank cut-offs already clamped
            to ``1..nd``, radii ``>= 0``.
        pr_curve: also return the micro-averaged counts by radius.

    Returns:
        dict of numpy arrays: ``values`` (one ``(nq,)`` float64 array per slot), ``n_rel`` ``(nq,)`` int64
        (relevant items per query) and ``pr_items`` / ``pr_rel`` (``(k + 1,)`` sums over queries of the items
        / relevant items within radius ``0..k``).
    """
    if not HAVE_NUMBA:  # pragma: no cover
        raise ImportError("the numba engine needs numba (pip install 'numba>=0.59')")
    unknown = [q for q, _ in slots if q not in QUANTITY_CODES]
    if unknown:
        raise ValueError(f"the numba engine cannot compute {unknown}; it computes {sorted(QUANTITY_CODES)}")
    nq, k = q_bits.shape
    nd = db_bits.shape[0]
    qc, dc = pack_bits(q_bits), pack_bits(db_bits)
    if multi:
        ql, dl = pack_bits(q_labels), pack_bits(db_labels)
        nlevels = int(q_labels.shape[1])
    else:
        ql = np.ascontiguousarray(q_labels, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
        dl = np.ascontiguousarray(db_labels, dtype=np.int64).astype(np.uint64).reshape(-1, 1)
        nlevels = 1
    nchunks = max(1, min(nq, numba.get_num_threads() * chunks_per_thread))
    sdtype = np.uint8 if 2 * k + 1 < 256 else np.uint16
    scratch = np.empty((nchunks, nd), dtype=sdtype)
    kinds = np.asarray([QUANTITY_CODES[q] for q, _ in slots], dtype=np.int64)
    cuts = np.asarray([c for _, c in slots], dtype=np.int64)
    # chunks are handed out one at a time (dynamic), so a thread slowed by other work on a
    # shared machine does not hold up the rest
    old = numba.set_parallel_chunksize(1)
    try:
        vals, rtot, pr_cnt, pr_rel = _kernel((qc, dc, ql, dl), (kinds, cuts), (int(k), int(nlevels)),
                                             (bool(multi), bool(pr_curve)), scratch)
    finally:
        numba.set_parallel_chunksize(old)
    return dict(values=[np.ascontiguousarray(vals[:, u]) for u in range(len(slots))], n_rel=rtot,
                pr_items=pr_cnt, pr_rel=pr_rel)
