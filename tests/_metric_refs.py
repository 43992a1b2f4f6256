"""Slow, obviously-correct reference implementations for the metric tests."""

from __future__ import annotations

import itertools
import math

import numpy as np


def to_bits(codes):
    c = np.asarray(codes)
    return (c == 1).astype(np.int64)


def hamming(q, d):
    q, d = to_bits(q), to_bits(d)
    return (q[:, None, :] != d[None, :, :]).sum(-1)


def rel_level(ql, dl):
    ql, dl = np.asarray(ql), np.asarray(dl)
    if ql.ndim == 1:
        return (ql[:, None] == dl[None, :]).astype(np.int64)
    return ql.astype(np.int64) @ dl.astype(np.int64).T


def stable_order(dist_row):
    return sorted(range(len(dist_row)), key=lambda j: (dist_row[j], j))


def ap_at(rel_ranked, K):
    hits, s, n = 0, 0.0, 0
    for p, r in enumerate(rel_ranked[:K], start=1):
        if r:
            hits += 1
            s += hits / p
            n += 1
    return s / n if n else 0.0


def ref_metrics(qc, dc, ql, dl, topk=None, radius=2, precision_at=(), ndcg_k=None, acg_k=None,
                wmap_topk=None, empty="zero", orders=None):
    """orders: optional per-query list of rankings to use instead of the stable one."""
    D = hamming(qc, dc)
    L = rel_level(ql, dl)
    nq, nd = D.shape
    K = nd if topk is None else min(topk, nd)
    res = {"map": [], "precision_radius": [], "ndcg": [], "acg": [], "wmap": []}
    for p in precision_at:
        res[f"precision@{p}"] = []
        res[f"recall@{p}"] = []
    empty_q = []
    for i in range(nq):
        order = orders[i] if orders is not None else stable_order(list(D[i]))
        lv = [int(L[i, j]) for j in order]
        rel = [1 if x > 0 else 0 for x in lv]
        tot = sum(1 for x in L[i] if x > 0)
        empty_q.append(tot == 0)
        res["map"].append(ap_at(rel, K))
        inside = [j for j in range(nd) if D[i, j] <= radius]
        res["precision_radius"].append(sum(1 for j in inside if L[i, j] > 0) / len(inside) if inside else 0.0)
        for p in precision_at:
            kk = min(p, nd)
            h = sum(rel[:kk])
            res[f"precision@{p}"].append(h / kk)
            res[f"recall@{p}"].append(h / tot if tot else 0.0)
        if ndcg_k is not None:
            kk = min(ndcg_k, nd)
            dcg = sum((2 ** lv[p] - 1) / math.log2(p + 2) for p in range(kk))
            ideal = sorted(L[i], reverse=True)
            idcg = sum((2 ** int(ideal[p]) - 1) / math.log2(p + 2) for p in range(kk))
            res["ndcg"].append(dcg / idcg if idcg > 0 else 0.0)
        if acg_k is not None:
            kk = min(acg_k, nd)
            res["acg"].append(sum(lv[:kk]) / kk)
        if wmap_topk is not None:
            kk = min(wmap_topk, nd)
            s, n = 0.0, 0
            for p in range(kk):
                if rel[p]:
                    s += sum(lv[: p + 1]) / (p + 1)
                    n += 1
            res["wmap"].append(s / n if n else 0.0)
    out = {}
    keep = [not e for e in empty_q] if empty == "skip" else [True] * nq
    for key, vals in res.items():
        if vals:
            sel = [v for v, kp in zip(vals, keep) if kp]
            out[key] = float(np.mean(sel)) if sel else 0.0
    out["num_queries_without_relevant"] = int(sum(empty_q))
    return out


def tie_group_orders(dist_row):
    """All rankings obtained by permuting items inside each group of equal distance."""
    groups = {}
    for j, d in enumerate(dist_row):
        groups.setdefault(d, []).append(j)
    keys = sorted(groups)
    perms = [list(itertools.permutations(groups[k])) for k in keys]
    for combo in itertools.product(*perms):
        yield [j for g in combo for j in g]


def ref_average(qc, dc, ql, dl, **kw):
    """Exact mean over all within-tie-group permutations, per query, then over queries."""
    D = hamming(qc, dc)
    nq = D.shape[0]
    per_q = []
    for i in range(nq):
        vals = []
        for order in tie_group_orders(list(D[i])):
            orders = [None] * nq
            orders[i] = order
            vals.append(ref_metrics(qc[i:i + 1], dc, ql[i:i + 1], dl, orders=[order], **kw))
        per_q.append({k: float(np.mean([v[k] for v in vals])) for k in vals[0]})
    return per_q
