"""Metric specs: a metric defined here, in the test, is computed by both engines through its spec alone."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _metric_refs import hamming, ref_metrics, rel_level, stable_order  # noqa: E402

from dsrh_lightning.metrics import METRICS, MetricSpec, ratio, retrieval_metrics  # noqa: E402
from dsrh_lightning.metrics import engine_numba  # noqa: E402
from dsrh_lightning.metrics.specs import metric_options, plan_metrics  # noqa: E402

ENGINES = [
    pytest.param("numba", marks=pytest.mark.skipif(not engine_numba.HAVE_NUMBA, reason="numba not installed")),
    "torch",
]

# Toy metrics, each one spec: F1@k from the hit count, success@k (a relevant item in the top k; not linear
# in the hits, so stable ties only), recall within the Hamming radius (shares precision_radius' option) and
# the mean multilevel gain of the top k per relevant item in the database.
F1 = MetricSpec("f1@{k}", "f1_at", ("hits",), lambda q, k, n_rel: ratio(2 * q["hits"], k + n_rel), kind="cutoffs",
                default=())
SUCCESS = MetricSpec("success@{k}", "success_at", ("hits",), lambda q, k, n_rel: (q["hits"] > 0) * 1.0,
                     kind="cutoffs", default=(), stable_only=True)
RECALL_RADIUS = MetricSpec("recall_radius", "radius", ("ball_rel",), lambda q, k, n_rel: ratio(q["ball_rel"], n_rel),
                           kind="radius", default=2)
GAIN_PER_REL = MetricSpec("gain_per_relevant", "gain_k", ("gain_sum",),
                          lambda q, k, n_rel: ratio(q["gain_sum"], n_rel))
TOYS = (F1, SUCCESS, RECALL_RADIUS, GAIN_PER_REL)


def _ref_toys(qc, dc, ql, dl, ks, radius, gain_k, empty):
    """Slow loops: every toy metric per query, then the mean over the kept queries."""
    D, L = hamming(qc, dc), rel_level(ql, dl)
    nq, nd = D.shape
    per = {f"f1@{k}": [] for k in ks} | {f"success@{k}": [] for k in ks} | {"recall_radius": [],
                                                                            "gain_per_relevant": []}
    keep = []
    for i in range(nq):
        order = stable_order(list(D[i]))
        lv = [int(L[i, j]) for j in order]
        tot = sum(1 for x in L[i] if x > 0)
        keep.append(tot > 0 or empty == "zero")
        for k in ks:
            kk = min(k, nd)
            hits = sum(1 for x in lv[:kk] if x > 0)
            per[f"f1@{k}"].append(2 * hits / (kk + tot))
            per[f"success@{k}"].append(1.0 if hits else 0.0)
        ball = sum(1 for j in range(nd) if D[i, j] <= radius and L[i, j] > 0)
        per["recall_radius"].append(ball / tot if tot else 0.0)
        per["gain_per_relevant"].append(sum(lv[:min(gain_k, nd)]) / tot if tot else 0.0)
    return {key: float(np.mean([v for v, kp in zip(vals, keep) if kp])) if any(keep) else 0.0
            for key, vals in per.items()}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_metric_added_by_spec_alone_matches_loop_reference(engine, multilabel, empty):
    rng = np.random.default_rng(11 + multilabel)
    for trial in range(5):
        nq, nd, bits = 7, int(rng.integers(1, 80)), int(rng.integers(1, 10))
        qc, dc = rng.integers(0, 2, (nq, bits)), rng.integers(0, 2, (nd, bits))
        if multilabel:
            ql, dl = (rng.random((nq, 5)) < 0.3).astype(int), (rng.random((nd, 5)) < 0.3).astype(int)
        else:
            ql, dl = rng.integers(0, 4, nq), rng.integers(0, 4, nd)
        kw = dict(f1_at=(1, 5, 200), success_at=(1, 5, 200), radius=int(rng.integers(0, 4)), gain_k=6)
        got = retrieval_metrics(qc, dc, ql, dl, specs=METRICS + TOYS, engine=engine, empty_queries=empty,
                                topk=10, ndcg_k=5, **kw)
        ref = _ref_toys(qc, dc, ql, dl, kw["f1_at"], kw["radius"], kw["gain_k"], empty)
        for key, val in ref.items():
            assert got[key] == pytest.approx(val, abs=1e-12), (trial, key)
        # the built-in metrics are unchanged by the extra specs
        base = ref_metrics(qc, dc, ql, dl, topk=10, radius=kw["radius"], ndcg_k=5, empty=empty)
        for key in ("map", "precision_radius", "ndcg"):
            assert got[key] == pytest.approx(base[key], abs=1e-12), key


def test_spec_metric_under_average_ties():
    # F1 is linear in the hit count, so its expectation over tie orders is F1 of the expected hits:
    # query 0000, database all at distance 0, one relevant item of 4: E[hits@2] = 1/2
    qc, dc = np.zeros((1, 4)), np.zeros((4, 4))
    ql, dl = np.array([1]), np.array([0, 0, 0, 1])
    got = retrieval_metrics(qc, dc, ql, dl, specs=METRICS + (F1,), ties="average", f1_at=2)
    assert got["f1@2"] == pytest.approx(2 * 0.5 / (2 + 1))
    stable = retrieval_metrics(qc, dc, ql, dl, specs=METRICS + (F1,), f1_at=2)
    assert stable["f1@2"] == 0.0  # the relevant item is last by index
    with pytest.raises(ValueError, match="success_at is only supported with ties='stable'"):
        retrieval_metrics(qc, dc, ql, dl, specs=METRICS + (SUCCESS,), ties="average", success_at=2)


def test_options_come_from_the_specs():
    assert list(metric_options()) == ["topk", "radius", "precision_at", "ndcg_k", "acg_k", "wmap_topk"]
    assert "f1_at" in metric_options(METRICS + TOYS)
    qc, dc, ql, dl = np.zeros((1, 4)), np.zeros((3, 4)), np.array([0]), np.array([0, 1, 0])
    with pytest.raises(TypeError, match="f1_at"):
        retrieval_metrics(qc, dc, ql, dl, f1_at=3)  # not an option of the default specs
    with pytest.raises(ValueError, match="f1_at must be >= 1"):
        retrieval_metrics(qc, dc, ql, dl, specs=METRICS + (F1,), f1_at=0)
    # shared quantities are computed once: precision@5, recall@5 and f1@5 read one hits slot
    plan = plan_metrics(100, "stable", {"precision_at": (5,), "f1_at": (5,)}, specs=METRICS + (F1,))
    assert sum(1 for q, c in plan.slots if q == "hits") == 1
    assert [e.key for e in plan.entries] == ["map", "precision_radius", "precision@5", "recall@5", "f1@5"]


def test_spec_checks():
    with pytest.raises(ValueError, match="unknown quantities"):
        MetricSpec("x", "x_k", ("popcount",), lambda q, k, n: q)
    with pytest.raises(ValueError, match="ball_"):
        MetricSpec("x", "x_k", ("ball_rel",), lambda q, k, n: q)
    with pytest.raises(ValueError, match="k}"):
        MetricSpec("x", "x_k", ("hits",), lambda q, k, n: q, kind="cutoffs")
    clash = MetricSpec("other", "topk", ("hits",), lambda q, k, n: q["hits"])  # topk read as a plain cut-off
    with pytest.raises(ValueError, match="share option 'topk'"):
        metric_options(METRICS + (clash,))


def test_ratio_on_numpy_and_torch():
    num, den = np.array([1.0, 2.0, 3.0]), np.array([2.0, 0.0, 4.0])
    assert ratio(num, den).tolist() == [0.5, 0.0, 0.75]
    t = ratio(torch.tensor(num, dtype=torch.float64), torch.tensor([2, 0, 4]))
    assert t.dtype == torch.float64 and t.tolist() == [0.5, 0.0, 0.75]


def test_readme_metric_example_defines_the_same_f1():
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "MetricSpec(" in b)
    scope: dict = {}
    exec(compile(block, "README.md (Adding a metric)", "exec"), scope)
    rng = np.random.default_rng(0)
    case = (rng.integers(0, 2, (6, 8)), rng.integers(0, 2, (40, 8)), rng.integers(0, 3, 6), rng.integers(0, 3, 40))
    a = retrieval_metrics(*case, specs=METRICS + (scope["F1"],), f1_at=(10, 100))
    b = retrieval_metrics(*case, specs=METRICS + (F1,), f1_at=(10, 100))
    assert a["f1@10"] == b["f1@10"] and a["f1@100"] == b["f1@100"] and 0 < a["f1@10"] < 1
