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
   counter is the number of relevant items up to and including ``j``. Precision
   at every relevant position (AP), precision@k counts, DCG, ACG and weighted AP
   accumulate from these, in float64. Items beyond the bucket that holds the
   largest cut-off are skipped.

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

__all__ = ["HAVE_NUMBA", "pack_bits", "numba_retrieval_arrays"]


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
    def _query(i, qc, dc, ql, dl, multi, scr, h, rsum, rhist, nb, rb, rsb, pbuf, jbuf,
               k, rad, k_map, ks, k_ndcg, k_acg, k_wmap, k_max, need_rsum, need_rhist,
               ap, prec_r, rtot, pat, ndcg, acg, wmap, pr_cnt, pr_rel, do_pr, c):
        nd = dc.shape[0]
        W = dc.shape[1]
        L = dl.shape[1]
        # flat views: 1-D indexing is much faster in the hot loops than 2-D indexing
        dc1 = dc.ravel()
        dl1 = dl.ravel()
        V = k + 1
        h[:] = 0
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
        n_rad = 0
        r_rad = 0
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
            if v == rad:
                n_rad = n_acc
                r_rad = r_acc
            if not found and n_acc >= k_max:
                vcut = v
                found = True
        if rad >= V:
            n_rad = n_acc
            r_rad = r_acc
        rtot[i] = r_acc
        prec_r[i] = r_rad / n_rad if n_rad > 0 else 0.0
        # ---- pass 2: walk in index order; bucket counters give stable positions
        nks = ks.shape[0]
        want_r = k_ndcg > 0 or k_acg > 0 or k_wmap > 0
        s_ap = 0.0
        n_ap = 0
        dcg = 0.0
        acg_s = 0.0
        w_s = 0.0
        n_w = 0
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
        # 2b: metrics from the recorded relevant items (index order, not rank order; the
        # per-bucket relevant counters make the hit counts exact all the same)
        for t in range(m):
            pos = np.int64(pbuf[t])
            if pos > k_max:
                continue
            j = np.int64(jbuf[t])
            v = scr[j] >> 1
            rb[v] += 1
            hits = rb[v]
            if pos <= k_map:
                s_ap += hits / pos
                n_ap += 1
            for u in range(nks):
                if pos <= ks[u]:
                    pat[i, u] += 1
            if want_r:
                if multi:
                    r = 0
                    for w in range(L):
                        r += _popcount(ql[i, w] & dl1[j * L + w])
                else:
                    r = 1
                if k_ndcg > 0 and pos <= k_ndcg:
                    dcg += (2.0 ** r - 1.0) / math.log2(pos + 1.0)
                if k_acg > 0 and pos <= k_acg:
                    acg_s += r
                if k_wmap > 0:
                    rsb[v] += r
                    if pos <= k_wmap:
                        w_s += rsb[v] / pos
                        n_w += 1
        ap[i] = s_ap / n_ap if n_ap > 0 else 0.0
        if k_acg > 0:
            acg[i] = acg_s / k_acg
        if k_wmap > 0:
            wmap[i] = w_s / n_w if n_w > 0 else 0.0
        if k_ndcg > 0:
            # ideal DCG: the whole database sorted by r (descending), first k_ndcg positions
            idcg = 0.0
            p = 0
            top = rhist.shape[0] - 1
            for val in range(top, 0, -1):
                g = 2.0 ** val - 1.0
                for _ in range(rhist[val]):
                    if p >= k_ndcg:
                        break
                    p += 1
                    idcg += g / math.log2(p + 1.0)
                if p >= k_ndcg:
                    break
            ndcg[i] = dcg / idcg if idcg > 0 else 0.0

    @njit(parallel=True, cache=True, fastmath=False)
    def _kernel(qc, dc, ql, dl, multi, scratch, k, rad, k_map, ks, k_ndcg, k_acg, k_wmap,
                nlevels, do_pr):
        nq = qc.shape[0]
        nchunks = scratch.shape[0]
        V = k + 1
        k_max = k_map
        for t in range(ks.shape[0]):
            k_max = max(k_max, ks[t])
        k_max = max(k_max, max(k_ndcg, max(k_acg, k_wmap)))
        need_rsum = k_wmap > 0
        need_rhist = k_ndcg > 0
        ap = np.zeros(nq)
        prec_r = np.zeros(nq)
        rtot = np.zeros(nq, np.int64)
        pat = np.zeros((nq, ks.shape[0]), np.int64)
        ndcg = np.zeros(nq)
        acg = np.zeros(nq)
        wmap = np.zeros(nq)
        pr_cnt = np.zeros((nchunks, V), np.int64)
        pr_rel = np.zeros((nchunks, V), np.int64)
        per = (nq + nchunks - 1) // nchunks
        for c in prange(nchunks):
            h = np.zeros(2 * V, np.int64)
            rsum = np.zeros(V, np.int64)
            rhist = np.zeros(nlevels + 1, np.int64)
            nb = np.zeros(V, np.int64)
            rb = np.zeros(V, np.int64)
            rsb = np.zeros(V, np.int64)
            scr = scratch[c]
            pbuf = np.empty(dc.shape[0] + 1, np.int32)
            jbuf = np.empty(dc.shape[0] + 1, np.int32)
            for i in range(c * per, min(nq, (c + 1) * per)):
                _query(i, qc, dc, ql, dl, multi, scr, h, rsum, rhist, nb, rb, rsb, pbuf, jbuf,
                       k, rad, k_map, ks, k_ndcg, k_acg, k_wmap, k_max, need_rsum, need_rhist,
                       ap, prec_r, rtot, pat, ndcg, acg, wmap, pr_cnt, pr_rel, do_pr, c)
        return ap, prec_r, rtot, pat, ndcg, acg, wmap, pr_cnt.sum(0), pr_rel.sum(0)


def numba_retrieval_arrays(q_bits, db_bits, q_labels, db_labels, *, multi: bool, radius: int,
                           k_map: int, ks, k_ndcg, k_acg, k_wmap, pr_curve: bool,
                           chunks_per_thread: int = 16):
    """Per-query metric arrays from the numba kernel.

    Args:
        q_bits, db_bits: ``(nq, k)`` / ``(nd, k)`` uint8 {0,1} numpy arrays.
        q_labels, db_labels: ``(n,)`` non-negative class ids, or ``(n, c)`` 0/1 multi-hot.
        multi: multi-hot labels.
        radius: Hamming radius for the precision within the ball.
        k_map, ks, k_ndcg, k_acg, k_wmap: cut-offs already clamped to ``1..nd``
            (None for the multilevel ones that are not wanted).
        pr_curve: also return the micro-averaged counts by radius.

    Returns:
        dict of numpy arrays: ``ap``, ``prec_r``, ``rtot`` (relevant items per query),
        ``pat`` (``(nq, len(ks))`` relevant counts in the top k), ``ndcg``, ``acg``,
        ``wmap`` and ``pr_cnt`` / ``pr_rel`` (``(k + 1,)`` sums over queries of the
        items / relevant items within radius ``0..k``).
    """
    if not HAVE_NUMBA:  # pragma: no cover
        raise ImportError("the numba engine needs numba (pip install 'numba>=0.59')")
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
    ks_arr = np.asarray(list(ks), dtype=np.int64)
    # chunks are handed out one at a time (dynamic), so a thread slowed by other work on a
    # shared machine does not hold up the rest
    old = numba.set_parallel_chunksize(1)
    try:
        ap, prec_r, rtot, pat, ndcg, acg, wmap, pr_cnt, pr_rel = _kernel(
            qc, dc, ql, dl, bool(multi), scratch, int(k), int(min(radius, k)), int(k_map), ks_arr,
            int(k_ndcg or 0), int(k_acg or 0), int(k_wmap or 0), int(nlevels), bool(pr_curve))
    finally:
        numba.set_parallel_chunksize(old)
    return dict(ap=ap, prec_r=prec_r, rtot=rtot, pat=pat, ndcg=ndcg, acg=acg, wmap=wmap,
                pr_cnt=pr_cnt, pr_rel=pr_rel)
