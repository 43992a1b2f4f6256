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

Each metric is a spec (:mod:`.specs`): the engines compute the per-query quantities the
requested specs need (AP, hit counts, DCG, ...) at their cut-offs, and each spec's
``finish`` turns them into its per-query values; ``specs=`` adds metrics.

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

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from ..relevance import relevance_matrix, shared_label_counts, validate_labels
from . import engine_numba
from .codes import bits_to_pm1, codes_to_bits, _distances_from_pm1
from .ranking import bucket_histogram, pad_distances, within_bucket_rank
from .specs import METRICS, MetricSpec, Plan, plan_metrics

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


def _check_policies(ties: str, empty_queries: str, engine: str) -> None:
    """Reject unknown values of the three policy arguments."""
    if ties not in ("stable", "average"):
        raise ValueError(f"ties must be 'stable' or 'average', got {ties!r}")
    if empty_queries not in ("zero", "skip"):
        raise ValueError(f"empty_queries must be 'zero' or 'skip', got {empty_queries!r}")
    if engine not in ("auto", "numba", "torch"):
        raise ValueError(f"engine must be 'auto', 'numba' or 'torch', got {engine!r}")


def _pick_engine(engine: str, ties: str, inputs) -> tuple[bool, bool]:
    """``(use_numba, on_cpu)``: numba when asked for, or for ``"auto"`` with CPU inputs, stable ties and numba."""
    if engine == "numba":
        if ties != "stable":
            raise ValueError("engine='numba' supports ties='stable' only (use engine='torch' or 'auto')")
        if not engine_numba.HAVE_NUMBA:
            raise ImportError("engine='numba' needs numba: pip install 'numba>=0.59'")
    on_cpu = not any(isinstance(x, torch.Tensor) and x.device.type != "cpu" for x in inputs)
    use_numba = engine == "numba" or (engine == "auto" and ties == "stable" and engine_numba.HAVE_NUMBA and on_cpu)
    return use_numba, on_cpu


def _block_size(block_size: int | None, nq: int, nd: int) -> int:
    """Queries per block of the torch engine: as given, or from the memory budget."""
    if block_size is None:
        return max(1, min(nq, _MEMORY_BUDGET // (_BYTES_PER_PAIR * nd)))
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    return block_size


@dataclass
class _PerQuery:
    """What an engine returns: per-query values as numpy arrays (numba) or tensors (torch, on the codes'
    device). The summary keeps each engine's own library, so the numbers do not depend on a conversion.

    ``values``: one ``(nq,)`` float64 array per slot of the plan (``(quantity, cut-off)``).
    ``n_rel``: ``(nq,)`` int64 relevant items in the whole database.
    ``pr_items``, ``pr_rel``: ``(k + 1,)`` int64 sums over queries of the items / relevant items within
    radius ``0..k``, or None without ``pr_curve``.
    """

    values: list
    n_rel: Any
    pr_items: Any = None
    pr_rel: Any = None

    @staticmethod
    def concat(blocks: list) -> "_PerQuery":
        """Rows of the query blocks one after the other; the PR counts summed (torch)."""
        def total(name):
            parts = [getattr(b, name) for b in blocks]
            return None if parts[0] is None else torch.stack(parts).sum(0)

        return _PerQuery(values=[torch.cat([b.values[t] for b in blocks]) for t in range(len(blocks[0].values))],
                         n_rel=torch.cat([b.n_rel for b in blocks]),
                         pr_items=total("pr_items"), pr_rel=total("pr_rel"))


def retrieval_metrics(
    query_codes,
    db_codes,
    query_labels,
    db_labels,
    *,
    pr_curve: bool = False,
    ties: str = "stable",
    empty_queries: str = "zero",
    block_size: int | None = None,
    engine: str = "auto",
    specs: Sequence[MetricSpec] = METRICS,
    **options,
) -> dict:
    """Hamming-ranking retrieval metrics in one blockwise pass over the queries.

    Args:
        query_codes: ``(nq, k)`` codes in {0,1} or {-1,+1}.
        db_codes: ``(nd, k)`` codes, same convention.
        query_labels: ``(nq,)`` class ids or ``(nq, c)`` multi-hot.
        db_labels: ``(nd,)`` or ``(nd, c)``, same layout as ``query_labels``.
        pr_curve: add ``pr_curve`` (micro-averaged precision/recall by radius 0..k).
        ties: ``"stable"`` (rank by distance, then database index) or ``"average"``
            (exact expectation over random orders inside groups of equal distance).
        empty_queries: ``"zero"`` or ``"skip"`` for queries without a relevant item.
        block_size: queries per block of the torch engine (None = from a ~512 MiB
            memory budget); the numba engine ignores it.
        engine: ``"auto"`` (numba for CPU inputs with ``ties="stable"`` when numba is
            installed, else torch), ``"numba"`` or ``"torch"``.
        specs: the per-query metrics (:data:`~dsrh_lightning.metrics.specs.METRICS` by default).
        **options: the metrics' options (see :mod:`.specs`); with the default specs:
            ``topk`` (AP cut-off K, None = whole database), ``radius`` (Hamming radius of
            ``precision_radius``, default 2), ``precision_at`` (cut-offs of ``precision@k`` and
            ``recall@k``), ``ndcg_k``, ``acg_k``, ``wmap_topk`` (cut-offs of the multilevel
            metrics, None = not computed).

    Returns:
        dict with ``map``, ``precision_radius``, ``precision@k``/``recall@k``,
        optional ``ndcg``/``acg``/``wmap``/``pr_curve``, ``num_queries``,
        ``num_database``, ``bits``, ``num_queries_without_relevant``.
    """
    # check
    _check_policies(ties, empty_queries, engine)
    use_numba, on_cpu = _pick_engine(engine, ties, (query_codes, db_codes, query_labels, db_labels))
    qb, db, ql, dl = _validate_inputs(query_codes, db_codes, query_labels, db_labels, as_numpy=use_numba and on_cpu)
    nq, k = qb.shape
    nd = db.shape[0]
    plan = plan_metrics(nd, ties, options, pr_curve=pr_curve, specs=specs)
    block_size = _block_size(block_size, nq, nd)
    # dispatch
    if use_numba:
        per_query = _numba_engine(qb, db, ql, dl, plan)
    else:
        per_query = _torch_engine(qb, db, ql, dl, plan, ties=ties, block_size=block_size)
    # summarise
    return _summarise(per_query, plan, nq=nq, nd=nd, bits=k, ties=ties, empty_queries=empty_queries)


def _safe_div(num, den):
    """``num / den`` in float64, 0 where ``den <= 0``; numpy arrays or tensors (broadcast), kept in their library."""
    if isinstance(num, torch.Tensor):
        den = den.to(torch.float64)
        return torch.where(den > 0, num.to(torch.float64) / den.clamp_min(1e-300), torch.zeros_like(den))
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros(np.broadcast(num, den).shape), where=den > 0)


def _summarise(pq: _PerQuery, plan: Plan, *, nq: int, nd: int, bits: int, ties: str, empty_queries: str) -> dict:
    """The result dict of either engine: each metric's per-query values (from its spec) averaged under the
    empty-query policy, the PR curve and the bookkeeping fields."""
    has_rel = pq.n_rel > 0
    skip = empty_queries == "skip"

    def mean(x) -> float:
        """Mean over the kept queries (all with ``"zero"``, those with a relevant item with ``"skip"``)."""
        if skip:
            x = x[has_rel]
        n = int(x.shape[0])
        return float(x.sum() / n) if n else 0.0

    out: dict = {}
    for e in plan.entries:
        q = {name: pq.values[slot] for name, slot in e.slots.items()}
        vals = e.spec.finish(q, e.cut, pq.n_rel)  # float64 in most specs; a bool or float32 result is widened
        vals = vals.to(torch.float64) if isinstance(vals, torch.Tensor) else np.asarray(vals, dtype=np.float64)
        out[e.key] = mean(vals)
    if plan.pr_curve:
        out["pr_curve"] = {"radius": list(range(bits + 1)),
                           "precision": _safe_div(pq.pr_rel, pq.pr_items).tolist(),
                           "recall": _safe_div(pq.pr_rel, pq.n_rel.sum()).tolist(),
                           "averaging": "micro"}
    out.update(num_queries=int(nq), num_database=int(nd), bits=int(bits))
    if "topk" in plan.values:
        out["topk"] = int(plan.values["topk"])
    out.update(ties=ties, empty_queries=empty_queries, num_queries_without_relevant=int((~has_rel).sum()))
    return out


def _numba_engine(qb, db, ql, dl, plan: Plan) -> _PerQuery:
    """Per-query quantities from the numba kernel (``ties="stable"``, CPU); numpy arrays.

    ``qb`` ``(nq, k)`` / ``db`` ``(nd, k)`` uint8 bits and labels ``(n,)`` int64 or ``(n, c)`` uint8 as
    numpy arrays, or (``engine="numba"`` with inputs on another device) the checked tensors.
    """
    multi = ql.ndim == 2
    if isinstance(qb, torch.Tensor):  # engine="numba" with inputs on another device
        qb, db = qb.cpu().numpy(), db.cpu().numpy()
        if multi:
            ql, dl = (ql > 0.5).cpu().numpy().view(np.uint8), (dl > 0.5).cpu().numpy().view(np.uint8)
        else:
            ql, dl = ql.cpu().numpy(), dl.cpu().numpy()
    res = engine_numba.numba_retrieval_arrays(qb, db, ql, dl, multi=multi, slots=plan.slots, pr_curve=plan.pr_curve)
    return _PerQuery(values=res["values"], n_rel=res["n_rel"], pr_items=res["pr_items"], pr_rel=res["pr_rel"])


def _torch_engine(qb, db, ql, dl, plan: Plan, *, ties: str, block_size: int) -> _PerQuery:
    """Per-query quantities from the blockwise tensor engine, on the codes' device (both tie rules).

    ``qb`` ``(nq, k)`` / ``db`` ``(nd, k)`` bool bits; labels ``(n,)`` int64 or ``(n, c)`` float32.
    """
    nq, k = qb.shape
    dev = qb.device
    harm, disc = _rank_tables(db.shape[0], dev)
    q_pm1, db_pm1, dl = bits_to_pm1(qb), bits_to_pm1(db.to(dev)), dl.to(dev)
    blocks = []
    for q0 in range(0, nq, block_size):
        q1 = min(nq, q0 + block_size)
        blk = _score_block(q_pm1[q0:q1], db_pm1, ql[q0:q1], dl, k, plan, ties)
        blocks.append(_stable_block(blk, plan, disc) if ties == "stable" else _average_block(blk, plan, harm, disc))
    return _PerQuery.concat(blocks)


def _rank_tables(nd: int, dev) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic numbers ``H_0..H_nd`` and cumulative DCG discounts ``sum_{p<=n} 1/log2(p+1)``: ``(nd + 1,)`` float64."""
    harm = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev),
                      torch.cumsum(1.0 / torch.arange(1, nd + 1, dtype=torch.float64, device=dev), 0)])
    disc = torch.cat([torch.zeros(1, dtype=torch.float64, device=dev),
                      torch.cumsum(1.0 / torch.log2(torch.arange(2, nd + 2, dtype=torch.float64, device=dev)), 0)])
    return harm, disc


@dataclass
class _Block:
    """One block of ``b`` queries scored against the whole database (``V = k + 1`` distance buckets).

    ``dist`` ``(b, nd)`` Hamming distances; ``dist_p`` the padded distances with an out-of-range sentinel
    (stable ties only, else None); ``idx`` the bucket of each (padded) item, int64; ``cnt`` ``(b, V)`` items
    per distance, ``ncum`` / ``nless`` its inclusive / exclusive prefix sums; ``rel`` ``(b, nd)`` bool
    relevance; ``r`` ``(b, nd)`` int32 shared labels (None unless multilevel); ``relc`` / ``rcum`` /
    ``rless`` ``(b, V)`` relevant items per distance and their prefix sums (None unless needed).
    """

    dist: torch.Tensor
    dist_p: torch.Tensor | None
    idx: torch.Tensor
    cnt: torch.Tensor
    ncum: torch.Tensor
    nless: torch.Tensor
    rel: torch.Tensor
    r: torch.Tensor | None
    relc: torch.Tensor | None
    rcum: torch.Tensor | None
    rless: torch.Tensor | None


def _score_block(q_pm1, db_pm1, ql, dl, k: int, plan: Plan, ties: str) -> _Block:
    """Distances, relevance and distance histograms of a block of queries ``(b, k)`` against ``(nd, k)``."""
    V = k + 1
    nd = db_pm1.shape[0]
    distf = _distances_from_pm1(q_pm1, db_pm1, k)
    rel = relevance_matrix(ql, dl)
    r = shared_label_counts(ql, dl).to(torch.int32) if plan.multilevel else None
    if ties == "stable":
        dist_p = pad_distances(distf, V)  # (b, padded) with an out-of-range sentinel
        dist = dist_p[:, :nd]
        idx = dist_p.long()
        cnt = bucket_histogram(idx, None, V + 1)[:, :V]
    else:
        dist_p = None
        dist = distf.to(torch.uint8 if k < 255 else torch.int16)
        idx = dist.long()
        cnt = bucket_histogram(idx, None, V)
    del distf
    ncum = cnt.cumsum(1)
    relc = rcum = rless = None
    if plan.pr_curve or ties == "average":
        relc = bucket_histogram(idx[:, :nd], rel.to(torch.int32), V).to(torch.int64)
        rcum = relc.cumsum(1)
        rless = rcum - relc
    return _Block(dist=dist, dist_p=dist_p, idx=idx, cnt=cnt, ncum=ncum, nless=ncum - cnt, rel=rel, r=r,
                  relc=relc, rcum=rcum, rless=rless)


def _block_counts(blk: _Block, plan: Plan) -> dict:
    """The tie-independent fields of a block's :class:`_PerQuery`: ``n_rel`` and the PR counts."""
    return dict(n_rel=blk.rel.view(torch.uint8).sum(1, dtype=torch.int64),
                pr_items=blk.ncum.sum(0) if plan.pr_curve else None,
                pr_rel=blk.rcum.sum(0) if plan.pr_curve else None)


def _ball(blk: _Block, quantity: str, radius: int) -> torch.Tensor:
    """Relevant items (``ball_rel``) or items (``ball_items``) within Hamming distance ``radius``: ``(b,)`` float64."""
    rad = min(radius, blk.cnt.shape[1] - 1)
    if quantity == "ball_items":
        return blk.ncum[:, rad].to(torch.float64)
    return (blk.rel & (blk.dist <= rad)).view(torch.uint8).sum(1, dtype=torch.int64).to(torch.float64)


def _stable_positions(blk: _Block, k_max: int):
    """Relevant items ranked within the top ``k_max`` by ``(distance, database index)``, sorted by query, then
    position: ``rows``, ``cols``, 1-based ``pos`` (each ``(m,)`` int64) and ``first`` ``(b,)``, the offset of
    each query's first entry."""
    b, nd = blk.rel.shape
    V = blk.cnt.shape[1]
    vcut = _cut_bucket(blk.ncum, k_max)
    rows, cols = torch.nonzero(blk.rel & (blk.dist <= vcut.view(-1, 1).to(blk.dist.dtype)), as_tuple=True)
    dsel = blk.dist[rows, cols].long()
    pos = blk.nless[rows, dsel] + within_bucket_rank(blk.dist_p, blk.idx, rows, cols, int(vcut.max()), V)
    keep = pos <= k_max
    rows, cols, pos = rows[keep], cols[keep], pos[keep]
    order = torch.argsort(rows * (nd + 1) + pos)
    rows, cols, pos = rows[order], cols[order], pos[order]
    first = torch.zeros(b, dtype=torch.int64, device=rows.device)
    first[1:] = torch.bincount(rows, minlength=b).cumsum(0)[:-1]
    return rows, cols, pos, first


def _stable_block(blk: _Block, plan: Plan, disc: torch.Tensor) -> _PerQuery:
    """A block's per-query quantities under ``ties="stable"`` (rank by distance, then database index)."""
    b = blk.rel.shape[0]
    rows, cols, pos, first = _stable_positions(blk, plan.k_max)
    # every relevant item ranked before a selected one is selected too, so the
    # cumulative relevant count is the item's rank among the selected of its query
    cumrel = torch.arange(rows.numel(), device=rows.device) - first[rows] + 1
    posf = pos.to(torch.float64)
    zero = torch.zeros_like(posf)

    def per_query(values: torch.Tensor) -> torch.Tensor:
        return torch.zeros(b, dtype=torch.float64, device=rows.device).index_add_(0, rows, values.to(torch.float64))

    r_sel = blk.r[rows, cols].to(torch.float64) if plan.multilevel else None
    ideal_hist = _ideal_dcg_hist(blk.r) if plan.wants("ideal_dcg") else None
    csum = start = None
    if plan.wants("wap"):
        csum = torch.cumsum(r_sel, 0)
        start = torch.cat([torch.zeros(1, dtype=torch.float64, device=rows.device), csum])[first[rows]]

    def quantity(name: str, c: int) -> torch.Tensor:
        if name in ("ball_rel", "ball_items"):
            return _ball(blk, name, c)
        if name == "ideal_dcg":
            return _ideal_dcg(ideal_hist, c, disc)
        inside = pos <= c
        if name == "ap":
            return _safe_div(per_query(torch.where(inside, cumrel / posf, zero)), per_query(inside))
        if name == "hits":
            return per_query(inside)
        if name == "dcg":
            return per_query(torch.where(inside, (torch.pow(2.0, r_sel) - 1) / torch.log2(posf + 1), zero))
        if name == "gain_sum":
            return per_query(torch.where(inside, r_sel, zero))
        if name == "wap":
            return _safe_div(per_query(torch.where(inside, (csum - start) / posf, zero)), per_query(inside))
        raise ValueError(f"the torch engine cannot compute {name!r}")

    return _PerQuery(values=[quantity(name, c) for name, c in plan.slots], **_block_counts(blk, plan))


def _average_block(blk: _Block, plan: Plan, harm: torch.Tensor, disc: torch.Tensor) -> _PerQuery:
    """A block's per-query quantities under ``ties="average"`` (exact expectation over orders inside tie groups)."""
    V = blk.cnt.shape[1]
    cntf, relf = blk.cnt.to(torch.float64), blk.relc.to(torch.float64)

    def quantity(name: str, c: int) -> torch.Tensor:
        if name in ("ball_rel", "ball_items"):
            return _ball(blk, name, c)
        if name == "ap":
            return _average_ap(blk.cnt, blk.relc, blk.nless, blk.rless, c, harm)
        if name == "hits":
            return (_positions_in(blk.nless, blk.cnt, c).to(torch.float64) * _safe_div(relf, cntf)).sum(1)
        if name == "dcg":
            gains = bucket_histogram(blk.idx, torch.pow(2.0, blk.r.to(torch.float64)) - 1, V)
            npos = _positions_in(blk.nless, blk.cnt, c)
            return (_safe_div(gains, cntf) * (disc[(blk.nless + npos)] - disc[blk.nless])).sum(1)
        if name == "ideal_dcg":
            return _ideal_dcg(_ideal_dcg_hist(blk.r), c, disc)
        if name == "gain_sum":
            rs = bucket_histogram(blk.idx, blk.r.to(torch.float64), V)
            npos = _positions_in(blk.nless, blk.cnt, c).to(torch.float64)
            return (_safe_div(rs, cntf) * npos).sum(1)
        raise ValueError(f"{name!r} has no closed form under ties='average'")

    return _PerQuery(values=[quantity(name, c) for name, c in plan.slots], **_block_counts(blk, plan))


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
