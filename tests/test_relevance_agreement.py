"""One definition of relevance: sampling, in-batch miners, Zhao's weighted triplets and the retrieval metrics
agree with one obviously-correct loop over shared labels (multi-label and single-label data)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dsrh_lightning.data.sampling import sample_triplets
from dsrh_lightning.losses.miners import mine_all_triplets, multilevel_mask
from dsrh_lightning.metrics import retrieval_metrics


def _shared(a, b) -> int:
    """Loop reference: labels two items share (1/0 for class ids)."""
    if np.ndim(a) == 0:
        return int(a == b)
    return sum(1 for x, y in zip(a, b) if x == 1 and y == 1)


@pytest.fixture(params=["multi", "single"])
def labels(request):
    rng = np.random.default_rng(3)
    if request.param == "single":
        return rng.integers(0, 4, 24)
    lab = (rng.random((24, 5)) < 0.35).astype(np.int64)
    lab[np.arange(24), rng.integers(0, 5, 24)] = 1
    return lab


def test_sampled_triplets_follow_shared_labels(labels):
    for a, p, n in sample_triplets(labels, per_anchor=3, seed=0):
        assert a != p and _shared(labels[a], labels[p]) >= 1 and _shared(labels[a], labels[n]) == 0


def test_mined_triplets_are_exactly_the_relevant_irrelevant_pairs(labels):
    t = torch.as_tensor(labels)
    mined = mine_all_triplets(t)
    got = {tuple(int(x) for x in row) for row in zip(*(m.tolist() for m in mined))}
    n = len(labels)
    want = {(a, p, q) for a in range(n) for p in range(n) for q in range(n)
            if a != p and a != q and _shared(labels[a], labels[p]) >= 1 and _shared(labels[a], labels[q]) == 0}
    assert got == want


def test_weighted_triplets_use_the_same_levels_and_ideal_dcg(labels):
    t = torch.as_tensor(labels)
    valid, weight = multilevel_mask(t)
    n = len(labels)
    for q in range(0, n, 5):
        r = [_shared(labels[q], labels[x]) if x != q else None for x in range(n)]
        gains = sorted((2 ** v - 1 for v in r if v is not None), reverse=True)
        z = sum(g / math.log2(pos + 2) for pos, g in enumerate(gains))
        for i in range(n):
            for j in range(n):
                ok = i != q and j != q and r[i] > r[j]
                assert bool(valid[q, i, j]) == ok
                expect = (2 ** r[i] - 2 ** r[j]) / z if ok else 0.0
                assert float(weight[q, i, j]) == pytest.approx(expect, rel=1e-5, abs=1e-7)


def test_metrics_relevance_and_ndcg_gain_use_the_same_levels(labels):
    """Codes that rank the database by the reference's relevance level give NDCG 1 and the level's ACG."""
    q_lab, db_lab = labels[:6], labels[6:]
    nd, bits = len(db_lab), 8
    levels = np.array([[_shared(a, b) for b in db_lab] for a in q_lab])
    for qi in range(len(q_lab)):
        # A database code at distance (max level - level) from the query: higher level ranks first.
        dist = levels[qi].max() - levels[qi]
        qc = np.zeros((1, bits), np.uint8)
        dc = np.zeros((nd, bits), np.uint8)
        for d in range(nd):
            dc[d, :dist[d]] = 1
        m = retrieval_metrics(qc, dc, q_lab[qi:qi + 1], db_lab, ndcg_k=nd, acg_k=5)
        assert m["ndcg"] == pytest.approx(1.0)
        assert m["acg"] == pytest.approx(np.sort(levels[qi])[::-1][:5].mean())
        relevant = levels[qi] >= 1  # binary relevance of MAP: shares at least one label
        order = np.lexsort((np.arange(nd), dist))
        hits = np.cumsum(relevant[order])
        ap = (hits / np.arange(1, nd + 1))[relevant[order]].mean() if relevant.any() else 0.0
        assert m["map"] == pytest.approx(ap)
