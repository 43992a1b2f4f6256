"""Retrieval metrics from binary codes in one blockwise pass over the queries.

For each block of queries, the whole database is scored at once: Hamming distances
(``uint8``/``int16``), binary relevance and, when needed, multilevel relevance
``r`` (shared labels). Ranking is by ``(distance, database index)`` computed by
bucketing (:mod:`.ranking`), never by a per-query sort, so results cannot depend
on a sort algorithm. With ``ties="average"`` the exact expectation over random
orders inside each group of equal distance is returned in closed form.

Definitions (``K`` = cut-off, ``pos`` = 1-based rank, ``rel`` = binary relevance):

* ``map``: mean over queries of AP@K = ``sum_{rel pos <= K} prec@pos / #rel in top K``
  (0 when no relevant item is in the top K); ``K`` = whole database when ``topk`` is None.
* ``precision_radius``: ``#rel / #items`` with distance ``<= radius``; 0 when empty.
* ``precision@k`` / ``recall@k``: ``#rel in top k / k`` and ``/ #rel in database``.
* ``ndcg``: DCG@k with gain ``2^r - 1`` and discount ``1/log2(pos+1)`` over the ideal
  DCG@k of the whole database sorted by ``r``.
* ``acg``: mean ``r`` over the top k.  ``wmap``: mean over relevant positions
  ``p <= K`` of ACG@p (0 if none); ``ties="stable"`` only.
* ``pr_curve``: precision and recall of the set within Hamming radius ``0..k``,
  **micro-averaged** over queries (sums of counts over all queries, then divided).

``empty_queries``: a query without any relevant item in the database gets 0 for
every per-query metric (``"zero"``) or is left out of every per-query mean
(``"skip"``). Cut-offs larger than the database mean the whole database.

Engines (``engine=``): ``"numba"`` (:mod:`.engine_numba`: popcount on packed bits and
two O(N) passes per query, parallel over queries; CPU, ``ties="stable"`` only) and
``"torch"`` (the blockwise tensor path below: any device, both tie rules).
``"auto"`` (default) picks numba for CPU inputs with ``ties="stable"`` when numba
imports, torch otherwise. Both give the same numbers (up to float64 rounding).
"""

from __future__ import annotations


import numpy as np
import torch

from ..relevance import relevance_matrix, shared_label_counts, validate_labels
from . import engine_numba
from .codes import bits_to_pm1, codes_to_bits, _distances_from_pm1
from .ranking import bucket_histogram, pad_distances, within_bucket_rank

__all__ = ["retrieval_metrics"]

_MEMORY_BUDGET = 1 << 29  # bytes of temporaries per query block (rough)
_BYTES_PER_PAIR = 64


def _as_tensor(x, name: str) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:  # pragma: no cover - defensive
        raise ValueError(f"{name}: cannot convert to a tensor ({exc})") from exc


def _check_cutoff(value, name: str, nd: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1 (use None for the whole database), got {value}")
    return int(min(int(value), nd))


def _validate_inputs(query_codes, db_codes, query_labels, db_labels, as_numpy: bool = False):
    """Checked ``(q_bits, db_bits, q_labels, db_labels)``: torch tensors on the codes' device, or,
    with ``as_numpy`` (CPU inputs only), numpy arrays (uint8 bits; int64 ids or uint8 multi-hot)."""
    qb = codes_to_bits(query_codes, "query_codes")
    db = codes_to_bits(db_codes, "db_codes")
    if qb.shape[1] != db.shape[1]:
        raise ValueError(
            f"bit widths differ: query_codes have {qb.shape[1]} bits, db_codes have {db.shape[1]}"
        )
    if qb.shape[1] == 0:
        raise ValueError("query_codes: codes have 0 bits")
    if qb.shape[0] == 0:
        raise ValueError("query_codes: no queries given")
    if db.shape[0] == 0:
        raise ValueError("db_codes: the database is empty")
    ql = _as_tensor(query_labels, "query_labels")
    dl = _as_tensor(db_labels, "db_labels")
    validate_labels(ql, "query_labels")
    validate_labels(dl, "db_labels")
    if ql.shape[0] != qb.shape[0]:
        raise ValueError(f"query_labels has {ql.shape[0]} rows but query_codes has {qb.shape[0]}")
    if dl.shape[0] != db.shape[0]:
        raise ValueError(f"db_labels has {dl.shape[0]} rows but db_codes has {db.shape[0]}")
    if ql.ndim != dl.ndim:
        raise ValueError(
            f"query_labels are {'multi-hot' if ql.ndim == 2 else 'class ids'} but db_labels are "
            f"{'multi-hot' if dl.ndim == 2 else 'class ids'}; both must use the same layout"
        )
    if ql.ndim == 2 and ql.shape[1] != dl.shape[1]:
        raise ValueError(f"label widths differ: query_labels have {ql.shape[1]} columns, db_labels have {dl.shape[1]}")
    if as_numpy:
        qln, dln = ql.detach().cpu().numpy(), dl.detach().cpu().numpy()
        if qln.ndim == 2:
            qln, dln = (qln != 0).view(np.uint8), (dln != 0).view(np.uint8)
        else:
            qln, dln = qln.astype(np.int64, copy=False), dln.astype(np.int64, copy=False)
        return qb.numpy(), db.numpy(), qln, dln
    if ql.ndim == 2:
        ql, dl = ql.to(torch.float32), dl.to(torch.float32)
    else:
        ql, dl = ql.to(torch.int64), dl.to(torch.int64)
    return qb, db, ql.to(qb.device), dl.to(db.device)


def _safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    den = den.to(torch.float64)
    return torch.where(den > 0, num.to(torch.float64) / den.clamp_min(1e-300), torch.zeros_like(den))


def _cut_bucket(ncum: torch.Tensor, k: int) -> torch.Tensor:
    """Index of the distance bucket holding rank ``k`` for each row: ``(b,)`` int64."""
    return (ncum < k).sum(1)


def _hypergeom_pmf(y: torch.Tensor, n: torch.Tensor, m: torch.Tensor, draws: torch.Tensor) -> torch.Tensor:
    """P(Y = y) for Y relevant among ``draws`` taken from ``n`` items with ``m`` relevant (float64)."""
    lg = torch.lgamma

    def lchoose(a, b):
        return lg(a + 1) - lg(b + 1) - lg(a - b + 1)

    valid = (y >= 0) & (y <= m) & (draws - y >= 0) & (draws - y <= n - m)
    yc = torch.where(valid, y, torch.zeros_like(y))
    dy = torch.where(valid, draws - y, torch.zeros_like(y))
    logp = lchoose(m, yc) + lchoose(n - m, dy) - lchoose(n, draws)
    return torch.where(valid, torch.exp(logp), torch.zeros_like(logp))


def _expected_prec_sum(m, n, N, R, npos, harm):
    """E[sum of precisions at relevant positions among the first ``npos`` of a tie group].

    The group has ``n`` items (``m`` relevant, uniformly random order within it, or
    conditioned on ``m`` relevant among ``npos == n`` positions), preceded by ``N``
    items of which ``R`` are relevant. All float64 tensors of one shape.
    """
    b = torch.where(n > 1, (m - 1) / (n - 1).clamp_min(1), torch.zeros_like(m))
    hsum = harm[(N + npos).long()] - harm[N.long()]
    inner = b * npos + (R + 1 - b * (N + 1)) * hsum
    return torch.where(m > 0, m / n.clamp_min(1) * inner, torch.zeros_like(m))


def _pr_curve_dict(precision: list, recall: list) -> dict:
    """PR curve by Hamming radius 0..k (micro-averaged counts), as both engines report it."""
    return {"radius": list(range(len(precision))), "precision": precision, "recall": recall,
            "averaging": "micro"}


def _summary(nq, nd, k, k_map, ties, empty_queries, n_empty) -> dict:
    """The bookkeeping fields every result carries."""
    return dict(num_queries=int(nq), num_database=int(nd), bits=int(k), topk=int(k_map), ties=ties,
                empty_queries=empty_queries, num_queries_without_relevant=n_empty)


def retrieval_metrics(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    *,
    topk: int | None = None,
    radius: int = 2,
    precision_at=(),
    ndcg_k: int | None = None,
    acg_k: int | None = None,
    wmap_topk: int | None = None,
    pr_curve: bool = False,
    ties: str = "stable",
    empty_queries: str = "zero",
    block_size: int | None = None,
    engine: str = "auto",
) -> dict:
    """Hamming-ranking retrieval metrics in one blockwise pass over the queries.

    Args:
        query_codes: ``(nq, k)`` codes in {0,1} or {-1,+1}.
        db_codes: ``(nd, k)`` codes, same convention.
        query_labels: ``(nq,)`` class ids or ``(nq, c)`` multi-hot.
        db_labels: ``(nd,)`` or ``(nd, c)``, same layout as ``query_labels``.
        topk: AP cut-off K (None = whole database).
        radius: Hamming radius for ``precision_radius``.
        precision_at: cut-offs for ``precision@k`` and ``recall@k``.
        ndcg_k, acg_k, wmap_topk: cut-offs of the multilevel metrics (None = not computed).
        pr_curve: add ``pr_curve`` (micro-averaged precision/recall by radius 0..k).
        ties: ``"stable"`` (rank by distance, then database index) or ``"average"``
            (exact expectation over random orders inside groups of equal distance).
        empty_queries: ``"zero"`` or ``"skip"`` for queries without a relevant item.
        block_size: queries per block of the torch engine (None = from a ~512 MiB
            memory budget); the numba engine ignores it.
        engine: ``"auto"`` (numba for CPU inputs with ``ties="stable"`` when numba is
            installed, else torch), ``"numba"`` or ``"torch"``.

    Returns:
        dict with ``map``, ``precision_radius``, ``precision@k``/``recall@k``,
        optional ``ndcg``/``acg``/``wmap``/``pr_curve``, ``num_queries``,
        ``num_database``, ``bits``, ``num_queries_without_relevant``.
    """
    if ties not in ("stable", "average"):
        raise ValueError(f"ties must be 'stable' or 'average', got {ties!r}")
    if empty_queries not in ("zero", "skip"):
        raise ValueError(f"empty_queries must be 'zero' or 'skip', got {empty_queries!r}")
    if engine not in ("auto", "numba", "torch"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'torch', got {engine!r}")
    if engine == "numba":
        if ties != "stable":
            raise ValueError("engine='numba' supports ties='stable' only (use engine='torch' or 'auto')")
        if not engine_numba.HAVE_NUMBA:
            raise ImportError("engine='numba' needs numba: pip install 'numba>=0.59'")
    on_cpu = not any(isinstance(x, torch.Tensor) and x.device.type != "cpu"
                     for x in (query_codes, db_codes, query_labels, db_labels))
    use_numba = engine == "numba" or (engine == "auto" and ties == "stable" and engine_numba.HAVE_NUMBA and on_cpu)
    qb, db, ql, dl = _validate_inputs(query_codes, db_codes, query_labels, db_labels, as_numpy=use_numba and on_cpu)
    nq, k = qb.shape
    nd = db.shape[0]
    if isinstance(radius, bool) or not isinstance(radius, (int, np.integer)) or radius < 0:
        raise ValueError(f"radius must be an integer >= 0, got {radius!r}")
    k_map = nd if topk is None else _check_cutoff(topk, "topk", nd)
    if isinstance(precision_at, (int, np.integer)):
        precision_at = (precision_at,)
    p_ks = [(int(p), _check_cutoff(p, "precision_at", nd)) for p in precision_at]
    k_ndcg = _check_cutoff(ndcg_k, "ndcg_k", nd)
    k_acg = _check_cutoff(acg_k, "acg_k", nd)
    k_wmap = _check_cutoff(wmap_topk, "wmap_topk", nd)
    if k_wmap is not None and ties == "average":
        raise ValueError("wmap_topk is only supported with ties='stable'")
    multilevel = any(x is not None for x in (k_ndcg, k_acg, k_wmap))
    k_max = max([k_map] + [c for _, c in p_ks] + [c for c in (k_ndcg, k_acg, k_wmap) if c is not None])
    if block_size is None:
        block_size = max(1, min(nq, _MEMORY_BUDGET // (_BYTES_PER_PAIR * nd)))
    elif block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    if use_numba:
        return _numba_metrics(qb, db, ql, dl, radius=int(radius), k_map=k_map, p_ks=p_ks, k_ndcg=k_ndcg,
                              k_acg=k_acg, k_wmap=k_wmap, pr_curve=pr_curve, empty_queries=empty_queries)

    dev = qb.device
    V = k + 1
    ddtype = torch.uint8 if k < 255 else torch.int16
    q_pm1 = bits_to_pm1(qb)
    db_pm1 = bits_to_pm1(db.to(dev))
    dl = dl.to(dev)
    harm = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev),
                      torch.cumsum(1.0 / torch.arange(1, nd + 1, dtype=torch.float64, device=dev), 0)])
    disc = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev),
                      torch.cumsum(1.0 / torch.log2(torch.arange(2, nd + 2, dtype=torch.float64, device=dev)), 0)])

    f64 = dict(dtype=torch.float64, device=dev)
    ap = torch.zeros(nq, **f64)
    prec_r = torch.zeros(nq, **f64)
    n_rel_total = torch.zeros(nq, dtype=torch.int64, device=dev)
    p_at = {c: torch.zeros(nq, **f64) for _, c in p_ks}
    ndcg = torch.zeros(nq, **f64)
    acg = torch.zeros(nq, **f64)
    wmap = torch.zeros(nq, **f64)
    pr_items = torch.zeros(V, dtype=torch.int64, device=dev)
    pr_rel = torch.zeros(V, dtype=torch.int64, device=dev)
    rad = min(int(radius), k)

    for q0 in range(0, nq, block_size):
        q1 = min(nq, q0 + block_size)
        b = q1 - q0
        distf = _distances_from_pm1(q_pm1[q0:q1], db_pm1, k)
        rel = relevance_matrix(ql[q0:q1], dl)
        r = shared_label_counts(ql[q0:q1], dl).to(torch.int32) if multilevel else None
        if ties == "stable":
            dist_p = pad_distances(distf, V)  # (b, padded) with an out-of-range sentinel
            dist = dist_p[:, :nd]
            idx = dist_p.long()
            cnt = bucket_histogram(idx, None, V + 1)[:, :V]
        else:
            dist = distf.to(ddtype)
            idx = dist.long()
            cnt = bucket_histogram(idx, None, V)
        del distf
        ncum = cnt.cumsum(1)
        nless = ncum - cnt
        rtot = rel.view(torch.uint8).sum(1, dtype=torch.int64)
        n_rel_total[q0:q1] = rtot
        prec_r[q0:q1] = _safe_div((rel & (dist <= rad)).view(torch.uint8).sum(1, dtype=torch.int64), ncum[:, rad])
        if pr_curve or ties == "average":
            rel_i = rel.to(torch.int32)
            relc = bucket_histogram(idx[:, :nd], rel_i, V).to(torch.int64)
            rcum = relc.cumsum(1)
            rless = rcum - relc
        if pr_curve:
            pr_items += ncum.sum(0)
            pr_rel += rcum.sum(0)

        if multilevel:
            idcg_cache = _ideal_dcg_hist(r)

        if ties == "stable":
            vcut = _cut_bucket(ncum, k_max)
            rows, cols = torch.nonzero(rel & (dist <= vcut.view(-1, 1).to(dist.dtype)), as_tuple=True)
            dsel = dist[rows, cols].long()
            pos = nless[rows, dsel] + within_bucket_rank(dist_p, idx, rows, cols, int(vcut.max()), V)
            keep = pos <= k_max
            rows, cols, pos = rows[keep], cols[keep], pos[keep]
            # every relevant item ranked before a selected one is selected too, so the
            # cumulative relevant count is the item's rank among the selected of its query
            order = torch.argsort(rows * (nd + 1) + pos)
            rows, cols, pos = rows[order], cols[order], pos[order]
            first = torch.zeros(b, dtype=torch.int64, device=dev)
            first[1:] = torch.bincount(rows, minlength=b).cumsum(0)[:-1]
            cumrel = torch.arange(rows.numel(), device=dev) - first[rows] + 1
            posf = pos.to(torch.float64)

            def per_query(values: torch.Tensor) -> torch.Tensor:
                return torch.zeros(b, **f64).index_add_(0, rows, values.to(torch.float64))

            in_k = pos <= k_map
            num = per_query(torch.where(in_k, cumrel / posf, torch.zeros_like(posf)))
            ap[q0:q1] = _safe_div(num, per_query(in_k))
            for _, c in p_ks:
                p_at[c][q0:q1] = per_query(pos <= c)
            if multilevel:
                r_sel = r[rows, cols].to(torch.float64)
            if k_ndcg is not None:
                gain = torch.pow(2.0, r_sel) - 1
                dcg = per_query(torch.where(pos <= k_ndcg, gain / torch.log2(posf + 1), torch.zeros_like(posf)))
                ndcg[q0:q1] = _safe_div(dcg, _ideal_dcg(idcg_cache, k_ndcg, disc))
            if k_acg is not None:
                acg[q0:q1] = per_query(torch.where(pos <= k_acg, r_sel, torch.zeros_like(posf))) / k_acg
            if k_wmap is not None:
                csum = torch.cumsum(r_sel, 0)
                start = torch.cat([torch.zeros(1, **f64), csum])[first[rows]]
                cumr = csum - start
                in_w = pos <= k_wmap
                wnum = per_query(torch.where(in_w, cumr / posf, torch.zeros_like(posf)))
                wmap[q0:q1] = _safe_div(wnum, per_query(in_w))
        else:
            cntf, relf = cnt.to(torch.float64), relc.to(torch.float64)
            ap[q0:q1] = _average_ap(cnt, relc, nless, rless, k_map, harm)
            for _, c in p_ks:
                p_at[c][q0:q1] = (_positions_in(nless, cnt, c).to(torch.float64) * _safe_div(relf, cntf)).sum(1)
            if k_ndcg is not None:
                gains = bucket_histogram(idx[:, :nd], torch.pow(2.0, r.to(torch.float64)) - 1, V)
                npos = _positions_in(nless, cnt, k_ndcg)
                dsum = disc[(nless + npos)] - disc[nless]
                dcg = (_safe_div(gains, cntf) * dsum).sum(1)
                ndcg[q0:q1] = _safe_div(dcg, _ideal_dcg(idcg_cache, k_ndcg, disc))
            if k_acg is not None:
                rs = bucket_histogram(idx[:, :nd], r.to(torch.float64), V)
                npos = _positions_in(nless, cnt, k_acg).to(torch.float64)
                acg[q0:q1] = (_safe_div(rs, cntf) * npos).sum(1) / k_acg

    has_rel = n_rel_total > 0
    n_empty = int((~has_rel).sum())
    mask = has_rel if empty_queries == "skip" else torch.ones_like(has_rel)

    def mean(x: torch.Tensor) -> float:
        n = int(mask.sum())
        return float(x[mask].sum() / n) if n else 0.0

    out: dict = {"map": mean(ap), "precision_radius": mean(prec_r)}
    for p, c in p_ks:
        out[f"precision@{p}"] = mean(p_at[c] / c)
        out[f"recall@{p}"] = mean(_safe_div(p_at[c], n_rel_total))
    if k_ndcg is not None:
        out["ndcg"] = mean(ndcg)
    if k_acg is not None:
        out["acg"] = mean(acg)
    if k_wmap is not None:
        out["wmap"] = mean(wmap)
    if pr_curve:
        out["pr_curve"] = _pr_curve_dict(_safe_div(pr_rel, pr_items).tolist(),
                                         _safe_div(pr_rel, n_rel_total.sum().expand(V)).tolist())
    out.update(_summary(nq, nd, k, k_map, ties, empty_queries, n_empty))
    return out


def _numba_metrics(qb, db, ql, dl, *, radius, k_map, p_ks, k_ndcg, k_acg, k_wmap, pr_curve, empty_queries):
    """``retrieval_metrics`` (ties="stable") through the numba kernel; same keys and definitions."""
    nq, k = qb.shape
    nd = db.shape[0]
    multi = ql.ndim == 2
    if isinstance(qb, torch.Tensor):  # engine="numba" with inputs on another device
        qb, db = qb.cpu().numpy(), db.cpu().numpy()
        if multi:
            ql, dl = (ql > 0.5).cpu().numpy().view(np.uint8), (dl > 0.5).cpu().numpy().view(np.uint8)
        else:
            ql, dl = ql.cpu().numpy(), dl.cpu().numpy()
    res = engine_numba.numba_retrieval_arrays(
        qb, db, ql, dl, multi=multi, radius=radius, k_map=k_map,
        ks=[c for _, c in p_ks], k_ndcg=k_ndcg, k_acg=k_acg, k_wmap=k_wmap, pr_curve=pr_curve)
    rtot = res["rtot"]
    has_rel = rtot > 0
    n_empty = int((~has_rel).sum())
    mask = has_rel if empty_queries == "skip" else np.ones(nq, dtype=bool)
    n_kept = int(mask.sum())

    def mean(x: np.ndarray) -> float:
        return float(x[mask].sum() / n_kept) if n_kept else 0.0

    def safe_div(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        den = np.asarray(den, dtype=np.float64)
        return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)

    out: dict = {"map": mean(res["ap"]), "precision_radius": mean(res["prec_r"])}
    for t, (p, c) in enumerate(p_ks):
        hits = res["pat"][:, t].astype(np.float64)
        out[f"precision@{p}"] = mean(hits / c)
        out[f"recall@{p}"] = mean(safe_div(hits, rtot))
    if k_ndcg is not None:
        out["ndcg"] = mean(res["ndcg"])
    if k_acg is not None:
        out["acg"] = mean(res["acg"])
    if k_wmap is not None:
        out["wmap"] = mean(res["wmap"])
    if pr_curve:
        pr_rel = res["pr_rel"].astype(np.float64)
        out["pr_curve"] = _pr_curve_dict(safe_div(pr_rel, res["pr_cnt"]).tolist(),
                                         safe_div(pr_rel, np.full(k + 1, rtot.sum())).tolist())
    out.update(_summary(nq, nd, k, k_map, "stable", empty_queries, n_empty))
    return out


def _positions_in(nless: torch.Tensor, cnt: torch.Tensor, cutoff: int) -> torch.Tensor:
    """Number of each bucket's positions that fall within the top ``cutoff``: ``(b, V)``."""
    return torch.minimum(torch.clamp(cutoff - nless, min=0), cnt)


def _average_ap(cnt, relc, nless, rless, k_map, harm) -> torch.Tensor:
    """Exact E[AP@K] over random orders inside each tie group: ``(b,)`` float64."""
    b = cnt.shape[0]
    n, m = cnt.to(torch.float64), relc.to(torch.float64)
    N, R = nless.to(torch.float64), rless.to(torch.float64)
    vcut = _cut_bucket(nless + cnt, k_map)  # bucket holding rank K
    vidx = torch.arange(cnt.shape[1], device=cnt.device).view(1, -1)
    full = vidx < vcut.view(-1, 1)
    e_full = torch.where(full, _expected_prec_sum(m, n, N, R, n, harm), torch.zeros_like(m)).sum(1)
    ar = torch.arange(b, device=cnt.device)
    nc, mc, Nc, Rc = n[ar, vcut], m[ar, vcut], N[ar, vcut], R[ar, vcut]
    draws = k_map - Nc  # positions of the cut bucket inside the top K (>= 1)
    ymax = int(torch.minimum(mc, draws).max().item())
    y = torch.arange(ymax + 1, dtype=torch.float64, device=cnt.device).view(1, -1)
    shape = (b, ymax + 1)
    pmf = _hypergeom_pmf(y.expand(shape), nc.view(-1, 1).expand(shape), mc.view(-1, 1).expand(shape),
                         draws.view(-1, 1).expand(shape))
    dr = draws.view(-1, 1).expand(shape)
    c_y = _expected_prec_sum(y.expand(shape), dr, Nc.view(-1, 1).expand(shape), Rc.view(-1, 1).expand(shape), dr, harm)
    den = Rc.view(-1, 1) + y
    val = torch.where(den > 0, (e_full.view(-1, 1) + c_y) / den.clamp_min(1), torch.zeros_like(den))
    return (pmf * val).sum(1)


def _ideal_dcg_hist(r: torch.Tensor) -> torch.Tensor:
    """Per-query histogram of multilevel relevance values ``(b, max_r + 1)``."""
    top = int(r.max().item()) if r.numel() else 0
    return torch.zeros(r.shape[0], top + 1, dtype=torch.int64, device=r.device).scatter_add_(
        1, r.long(), torch.ones(1, 1, dtype=torch.int64, device=r.device).expand(r.shape)
    )


def _ideal_dcg(hist: torch.Tensor, cutoff: int, disc: torch.Tensor) -> torch.Tensor:
    """Ideal DCG@cutoff from the relevance histogram (database sorted by r, descending)."""
    flipped = hist.flip(1)  # column j holds value top - j
    top = hist.shape[1] - 1
    ends = flipped.cumsum(1)
    starts = ends - flipped
    gains = torch.pow(2.0, torch.arange(top, -1, -1, dtype=torch.float64, device=hist.device)) - 1
    dsum = disc[ends.clamp(max=cutoff)] - disc[starts.clamp(max=cutoff)]
    return (dsum * gains.view(1, -1)).sum(1)
