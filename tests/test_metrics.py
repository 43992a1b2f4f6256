"""Retrieval metrics vs slow references, sklearn, faiss and hand-checked cases."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _metric_refs import ref_average, ref_metrics  # noqa: E402

from dsrh_lightning.metrics import (  # noqa: E402
    binarize,
    codes_to_bits,
    hamming_distance,
    retrieval_metrics,
)
from dsrh_lightning.metrics import engine_numba  # noqa: E402

KW = dict(radius=1, precision_at=(1, 5, 100), ndcg_k=7, acg_k=4, wmap_topk=10)

# every stable-ties test runs on both engines; the numba one is skipped where numba is missing
ENGINES = [
    pytest.param("numba", marks=pytest.mark.skipif(not engine_numba.HAVE_NUMBA, reason="numba not installed")),
    "torch",
]
engines = pytest.mark.parametrize("engine", ENGINES)


def _random_case(rng, nq, nd, k, multilabel):
    qc, dc = rng.integers(0, 2, (nq, k)), rng.integers(0, 2, (nd, k))
    if multilabel:
        return qc, dc, (rng.random((nq, 5)) < 0.3).astype(int), (rng.random((nd, 5)) < 0.3).astype(int)
    return qc, dc, rng.integers(0, 4, nq), rng.integers(0, 4, nd)


@engines
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("topk", [None, 1, 3, 10, 1000])
@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_stable_matches_bruteforce(multilabel, topk, empty, engine):
    rng = np.random.default_rng(hash((multilabel, topk, empty)) % 2**32)
    for _ in range(4):
        case = _random_case(rng, 6, int(rng.integers(1, 70)), int(rng.integers(1, 9)), multilabel)
        got = retrieval_metrics(*case, topk=topk, empty_queries=empty, block_size=4, engine=engine, **KW)
        ref = ref_metrics(*case, topk=topk, empty=empty, **KW)
        for key, val in ref.items():
            assert got[key] == pytest.approx(val, abs=1e-9), key


def _assert_same(a: dict, b: dict, tol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "pr_curve":
            for sub in ("precision", "recall"):
                assert a[key][sub] == pytest.approx(b[key][sub], abs=tol), sub
            assert a[key]["radius"] == b[key]["radius"]
        elif isinstance(a[key], float):
            assert a[key] == pytest.approx(b[key], abs=tol), key
        else:
            assert a[key] == b[key], key


@pytest.mark.skipif(not engine_numba.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("bits", [12, 48, 64, 65, 100, 130])
@pytest.mark.parametrize("labels", ["single", "multi", "multi70"])
def test_engines_agree_with_reference_and_each_other(bits, labels):
    """Bit widths that are not multiples of 64 (several words, > 127 bits), > 64 label columns."""
    rng = np.random.default_rng(bits * 7 + len(labels))
    nq, nd = 5, 90
    # codes near a few prototypes: many equal distances, so the stable tie rule matters
    protos = rng.integers(0, 2, (3, bits))
    qc = protos[rng.integers(0, 3, nq)] ^ (rng.random((nq, bits)) < 0.05)
    dc = protos[rng.integers(0, 3, nd)] ^ (rng.random((nd, bits)) < 0.05)
    if labels == "single":
        ql, dl = rng.integers(0, 3, nq), rng.integers(0, 3, nd)
    else:
        c = 70 if labels == "multi70" else 6
        ql, dl = (rng.random((nq, c)) < 0.15).astype(int), (rng.random((nd, c)) < 0.15).astype(int)
        if c == 70:  # shared labels only in the second 64-bit word for some pairs
            ql[:2, :64] = 0
    kw = dict(topk=25, radius=bits // 3, precision_at=(1, 10, 90, 500), ndcg_k=15, acg_k=200, wmap_topk=30)
    a = retrieval_metrics(qc, dc, ql, dl, engine="numba", pr_curve=True, **kw)
    b = retrieval_metrics(qc, dc, ql, dl, engine="torch", pr_curve=True, **kw)
    _assert_same(a, b)
    ref = ref_metrics(qc, dc, ql, dl, empty="zero", **kw)
    for key, val in ref.items():
        assert a[key] == pytest.approx(val, abs=1e-9), key
    assert a["map"] > 0


@pytest.mark.skipif(not engine_numba.HAVE_NUMBA, reason="numba not installed")
@pytest.mark.parametrize("multilabel", [False, True])
@pytest.mark.parametrize("empty", ["zero", "skip"])
def test_engines_agree_heavy_ties(multilabel, empty):
    # 2 bits: only 3 distances for 400 items, so almost every item is tied with many others
    rng = np.random.default_rng(17 + multilabel)
    case = _random_case(rng, 30, 400, 2, multilabel)
    for topk in (None, 1, 57, 399, 400, 10**6):
        kw = dict(topk=topk, radius=1, precision_at=(1, 150, 400, 401), ndcg_k=100, acg_k=401, wmap_topk=None,
                  pr_curve=True, empty_queries=empty)
        _assert_same(retrieval_metrics(*case, engine="numba", **kw), retrieval_metrics(*case, engine="torch", **kw))
    qc, dc, ql, dl = case
    kw = dict(topk=57, radius=1, precision_at=(150,), ndcg_k=100, acg_k=401, wmap_topk=60)
    ref = ref_metrics(qc[:4], dc, ql[:4], dl, empty=empty, **kw)
    got = retrieval_metrics(qc[:4], dc, ql[:4], dl, empty_queries=empty, engine="numba", **kw)
    for key, val in ref.items():
        assert got[key] == pytest.approx(val, abs=1e-9), key


def test_engine_argument_and_dispatch(monkeypatch):
    qc, dc = np.zeros((1, 4)), np.zeros((3, 4))
    ql, dl = np.array([1]), np.array([0, 0, 1])
    with pytest.raises(ValueError, match="engine"):
        retrieval_metrics(qc, dc, ql, dl, engine="fast")
    if engine_numba.HAVE_NUMBA:
        with pytest.raises(ValueError, match="ties='stable'"):
            retrieval_metrics(qc, dc, ql, dl, engine="numba", ties="average")
    calls = []
    real = engine_numba.numba_retrieval_arrays

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_numba, "numba_retrieval_arrays", spy)
    retrieval_metrics(qc, dc, ql, dl)  # auto, CPU, stable
    assert len(calls) == (1 if engine_numba.HAVE_NUMBA else 0)
    retrieval_metrics(qc, dc, ql, dl, ties="average")
    retrieval_metrics(qc, dc, ql, dl, engine="torch")
    assert len(calls) == (1 if engine_numba.HAVE_NUMBA else 0)
    # without numba, auto falls back to torch and engine="numba" says what is missing
    monkeypatch.setattr(engine_numba, "HAVE_NUMBA", False)
    assert retrieval_metrics(qc, dc, ql, dl)["map"] == pytest.approx(1 / 3)
    with pytest.raises(ImportError, match="numba"):
        retrieval_metrics(qc, dc, ql, dl, engine="numba")


@pytest.mark.parametrize("multilabel", [False, True])
def test_average_ties_match_permutation_enumeration(multilabel):
    rng = np.random.default_rng(7 + multilabel)
    kw = dict(radius=1, precision_at=(1, 3), ndcg_k=3, acg_k=2)
    checked = 0
    for trial in range(25):
        case = _random_case(rng, 1, int(rng.integers(2, 8)), 2, multilabel)
        topk = [None, 1, 2, 3, 5][trial % 5]
        got = retrieval_metrics(*case, topk=topk, ties="average", **kw)
        ref = ref_average(*case, topk=topk, **kw)[0]
        for key in ("map", "precision@1", "precision@3", "recall@3", "ndcg", "acg"):
            assert got[key] == pytest.approx(ref[key], abs=1e-9), (trial, key)
            checked += 1
    assert checked > 0


def test_average_differs_from_stable_when_ties_matter():
    # query 0; database: distances all 0, relevant item last
    qc, dc = np.zeros((1, 4)), np.zeros((3, 4))
    ql, dl = np.array([1]), np.array([0, 0, 1])
    assert retrieval_metrics(qc, dc, ql, dl)["map"] == pytest.approx(1 / 3)
    # expected AP over random orders of 3 items with 1 relevant: (1 + 1/2 + 1/3) / 3
    assert retrieval_metrics(qc, dc, ql, dl, ties="average")["map"] == pytest.approx((1 + 1 / 2 + 1 / 3) / 3)


@engines
def test_sklearn_average_precision_on_tie_free_ranking(engine):
    sk = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    k = 12
    # database item j has exactly j bits set and query is all zeros: distances 0..k all distinct
    dc = np.array([[1] * j + [0] * (k - j) for j in range(k + 1)])
    perm = rng.permutation(k + 1)
    dc = dc[perm]
    dist = dc.sum(1)
    aps = []
    qls = rng.integers(0, 3, 5)
    dl = rng.integers(0, 3, k + 1)
    qc = np.zeros((5, k), dtype=int)
    for ql in qls:
        y = (dl == ql).astype(int)
        if y.sum():
            aps.append(sk.average_precision_score(y, -dist))
        else:
            aps.append(0.0)
    got = retrieval_metrics(qc, dc, qls, dl, engine=engine)
    assert got["map"] == pytest.approx(float(np.mean(aps)), abs=1e-12)


@engines
def test_hand_checked_case(engine):
    # query 0000; db distances [1, 0, 2, 1]; relevant items 0 and 2
    qc = np.zeros((1, 4))
    dc = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]])
    ql, dl = np.array([5]), np.array([5, 1, 5, 2])
    m = retrieval_metrics(qc, dc, ql, dl, radius=1, precision_at=(2,), engine=engine)
    # stable order: item1 (d0), item0 (d1), item3 (d1), item2 (d2) -> rel 0,1,0,1
    assert m["map"] == pytest.approx((1 / 2 + 2 / 4) / 2)
    assert m["precision_radius"] == pytest.approx(1 / 3)
    assert m["precision@2"] == pytest.approx(1 / 2)
    assert m["recall@2"] == pytest.approx(1 / 2)
    assert m["num_queries"] == 1 and m["num_database"] == 4 and m["bits"] == 4


@engines
def test_stable_tie_breaking_by_index(engine):
    # all distances equal: an index-ordered ranking puts the relevant item first
    qc, dc = np.zeros((1, 3)), np.ones((4, 3))
    ql, dl = np.array([0]), np.array([0, 1, 1, 0])
    m = retrieval_metrics(qc, dc, ql, dl, engine=engine)
    assert m["map"] == pytest.approx((1 + 2 / 4) / 2)
    # the same multiset of labels in another index order gives another (still deterministic) MAP,
    # so an unstable sort that permutes ties would change the result
    dl2 = np.array([1, 0, 0, 1])
    assert retrieval_metrics(qc, dc, ql, dl2, engine=engine)["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)


@engines
def test_last_database_item_counts(engine):
    qc, dc = np.zeros((1, 2)), np.zeros((5, 2))
    ql, dl = np.array([1]), np.array([0, 0, 0, 0, 1])
    for topk in (None, 5, 10**9):
        m = retrieval_metrics(qc, dc, ql, dl, topk=topk, precision_at=(5,), engine=engine)
        assert m["map"] == pytest.approx(1 / 5)
        assert m["recall@5"] == pytest.approx(1.0)
    assert retrieval_metrics(qc, dc, ql, dl, topk=4, engine=engine)["map"] == 0.0


@engines
def test_radius_precision_empty_radius_is_zero(engine):
    qc, dc = np.zeros((2, 6)), np.ones((3, 6))
    qc[1] = 1
    ql, dl = np.array([0, 0]), np.array([0, 0, 1])
    m = retrieval_metrics(qc, dc, ql, dl, radius=2, engine=engine)
    # query 0 has nothing within radius 2 (0), query 1 has all three (2/3)
    assert m["precision_radius"] == pytest.approx((0 + 2 / 3) / 2)


@engines
def test_empty_queries_zero_vs_skip(engine):
    qc, dc = np.zeros((2, 2)), np.zeros((3, 2))
    ql, dl = np.array([0, 9]), np.array([1, 0, 1])
    z = retrieval_metrics(qc, dc, ql, dl, empty_queries="zero", engine=engine)
    s = retrieval_metrics(qc, dc, ql, dl, empty_queries="skip", engine=engine)
    assert z["num_queries_without_relevant"] == 1 == s["num_queries_without_relevant"]
    assert s["map"] == pytest.approx(1 / 2)
    assert z["map"] == pytest.approx(1 / 4)
    with pytest.raises(ValueError, match="empty_queries"):
        retrieval_metrics(qc, dc, ql, dl, empty_queries="drop", engine=engine)


@engines
def test_pr_curve_micro_averaged(engine):
    qc, dc = np.zeros((1, 2)), np.array([[0, 0], [1, 0], [1, 1]])
    m = retrieval_metrics(qc, dc, np.array([0]), np.array([0, 1, 0]), pr_curve=True, engine=engine)
    assert m["pr_curve"]["precision"] == pytest.approx([1.0, 0.5, 2 / 3])
    assert m["pr_curve"]["recall"] == pytest.approx([0.5, 0.5, 1.0])


def test_validation_errors_name_the_argument():
    qc, dc = np.zeros((2, 4)), np.zeros((3, 4))
    ql, dl = np.array([0, 1]), np.array([0, 1, 1])
    with pytest.raises(ValueError, match="bit widths"):
        retrieval_metrics(qc, np.zeros((3, 5)), ql, dl)
    with pytest.raises(ValueError, match="query_labels"):
        retrieval_metrics(qc, dc, np.array([0]), dl)
    with pytest.raises(ValueError, match="db_labels"):
        retrieval_metrics(qc, dc, ql, np.array([0, 1]))
    with pytest.raises(ValueError, match="topk"):
        retrieval_metrics(qc, dc, ql, dl, topk=0)
    with pytest.raises(ValueError, match="ties"):
        retrieval_metrics(qc, dc, ql, dl, ties="random")
    with pytest.raises(ValueError, match="db_codes"):
        retrieval_metrics(qc, np.array([[0, 1, -1, 0]] * 3), ql, dl)
    with pytest.raises(ValueError, match="label widths"):
        retrieval_metrics(qc, dc, np.eye(2, 3), np.eye(3, 4))


def test_codes_to_bits_and_binarize():
    assert codes_to_bits(np.array([[-1, 1]]), "x").tolist() == [[0, 1]]
    assert codes_to_bits(torch.tensor([[0.0, 1.0]]), "x").tolist() == [[0, 1]]
    # dtypes numpy lacks take the torch path; both paths give the same errors
    assert codes_to_bits(torch.tensor([[-1.0, 1.0]], dtype=torch.bfloat16), "x").tolist() == [[0, 1]]
    with pytest.raises(ValueError, match=r"bf.*-1.*0.*1"):
        codes_to_bits(torch.tensor([[-1.0, 0.0, 1.0]], dtype=torch.bfloat16), "bf")
    with pytest.raises(ValueError, match=r"tt.*-1.*0.*1"):
        codes_to_bits(torch.tensor([[-1, 0, 1]]), "tt")
    with pytest.raises(ValueError, match=r"myname.*-1.*0.*1"):
        codes_to_bits(np.array([[-1, 0, 1]]), "myname")
    with pytest.raises(ValueError, match="0.5"):
        codes_to_bits(np.array([[0.5, 1]]))
    b = binarize(torch.tensor([0.0, 0.5, 0.51, 1.0]))
    assert b.dtype == torch.uint8 and b.tolist() == [0, 0, 1, 1]
    assert binarize(torch.tensor([0.0, -0.1]), threshold=-0.05).tolist() == [1, 0]


def test_hamming_matches_bruteforce_and_faiss():
    rng = np.random.default_rng(5)
    q, d = rng.integers(0, 2, (7, 64)), rng.integers(0, 2, (50, 64))
    got = hamming_distance(torch.as_tensor(q, dtype=torch.uint8), torch.as_tensor(d, dtype=torch.uint8))
    ref = (q[:, None] != d[None]).sum(-1)
    assert np.array_equal(got.numpy(), ref)
    faiss = pytest.importorskip("faiss")
    index = faiss.IndexBinaryFlat(64)
    index.add(np.packbits(d.astype(np.uint8), axis=1))
    dist, ids = index.search(np.packbits(q.astype(np.uint8), axis=1), 50)
    assert np.array_equal(np.take_along_axis(got.numpy(), ids, 1), dist)


def _shared_data() -> Path:
    env = os.environ.get("DSRH_SHARED_DATA")
    return Path(env) if env else (Path(__file__).resolve().parents[2] / "shared" / "data")


def _read_list(path: Path) -> np.ndarray:
    return np.array([[int(x) for x in line.split()[1:]] for line in path.read_text().splitlines() if line.strip()])


@engines
def test_nuswide21_multilabel_map_matches_reference(engine):
    root = _shared_data() / "nuswide21"
    if not (root / "train.txt").is_file() or not (root / "test.txt").is_file():
        pytest.skip(f"NUS-WIDE-21 label lists not found under {root} (set DSRH_SHARED_DATA)")
    dl, ql = _read_list(root / "train.txt"), _read_list(root / "test.txt")
    assert dl.shape[1] == 21 and ql.shape[1] == 21
    rng = np.random.default_rng(0)
    qi, di = rng.choice(len(ql), 12, replace=False), rng.choice(len(dl), 300, replace=False)
    ql, dl = ql[qi], dl[di]
    qc, dc = rng.integers(0, 2, (12, 16)), rng.integers(0, 2, (300, 16))
    kw = dict(topk=100, radius=3, precision_at=(10,), ndcg_k=50, acg_k=50, wmap_topk=100)
    got = retrieval_metrics(qc, dc, ql, dl, **kw, engine=engine)
    ref = ref_metrics(qc, dc, ql, dl, **kw)
    for key in ("map", "precision_radius", "precision@10", "ndcg", "acg", "wmap"):
        assert got[key] == pytest.approx(ref[key], abs=1e-9), key
    assert 0 < got["map"] < 1


@engines
def test_block_size_does_not_change_results(engine):
    rng = np.random.default_rng(2)
    case = _random_case(rng, 13, 200, 16, True)
    a = retrieval_metrics(*case, topk=50, ndcg_k=20, wmap_topk=30, block_size=1, engine=engine)
    b = retrieval_metrics(*case, topk=50, ndcg_k=20, wmap_topk=30, block_size=1000, engine=engine)
    assert a == b
