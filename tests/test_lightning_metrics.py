"""torchmetrics Metric classes: values vs retrieval_metrics, slow loops and scikit-learn; 2 processes (gloo) give
the values of 1; the README's plain LightningModule runs as written and logs HammingMAP."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _metric_refs import ref_metrics  # noqa: E402

from dsrh_lightning.lightning.callbacks.retrieval import CodeCollector  # noqa: E402
from dsrh_lightning.lightning.metrics import (  # noqa: E402
    HammingACG,
    HammingMAP,
    HammingNDCG,
    HammingRetrieval,
    PrecisionAtK,
    PrecisionWithinRadius,
    RecallAtK,
    WeightedMAP,
)
from dsrh_lightning.metrics import retrieval_metrics  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(topk=20, radius=2, precision_at=(5, 30), ndcg_k=10, acg_k=10, wmap_topk=25)


def _case(seed: int, nq: int = 11, nd: int = 57, bits: int = 12, multilabel: bool = True):
    rng = np.random.default_rng(seed)
    qc, dc = rng.integers(0, 2, (nq, bits)), rng.integers(0, 2, (nd, bits))
    if multilabel:
        return qc, dc, (rng.random((nq, 5)) < 0.3).astype(np.int64), (rng.random((nd, 5)) < 0.3).astype(np.int64)
    return qc, dc, rng.integers(0, 4, nq), rng.integers(0, 4, nd)


def _feed(metric, qc, dc, ql, dl, seed: int = 0, repeat: bool = True) -> None:
    """Shuffled batches of both sets, each batch repeating its first item (as distributed padding would)."""
    rng = np.random.default_rng(seed)
    for role, codes, labels in (("query", qc, ql), ("database", dc, dl)):
        for b in np.array_split(rng.permutation(len(codes)), 3):
            if repeat:
                b = np.concatenate([b, b[:1]])
            metric.update(torch.as_tensor(codes[b]), torch.as_tensor(labels[b]), torch.as_tensor(b), role=role)


def _named(k: int = 5):
    """Each named metric with the key of retrieval_metrics it must equal and the options it uses."""
    return [(HammingMAP(topk=20), "map"), (PrecisionWithinRadius(radius=2), "precision_radius"),
            (PrecisionAtK(k), f"precision@{k}"), (RecallAtK(k), f"recall@{k}"), (HammingNDCG(10), "ndcg"),
            (HammingACG(10), "acg"), (WeightedMAP(25), "wmap")]


@pytest.mark.parametrize("multilabel", [False, True])
def test_named_metrics_match_retrieval_metrics_and_loop_reference(multilabel):
    qc, dc, ql, dl = _case(3, multilabel=multilabel)
    want = retrieval_metrics(qc, dc, ql, dl, **OPTIONS)
    ref = ref_metrics(qc, dc, ql, dl, **OPTIONS)
    for metric, key in _named():
        _feed(metric, qc, dc, ql, dl)
        got = float(metric.compute())
        assert got == want[key], key  # the same engine on the same items: identical
        assert got == pytest.approx(ref[key], abs=1e-12), key
    everything = HammingRetrieval(**OPTIONS)
    _feed(everything, qc, dc, ql, dl)
    out = everything.compute()
    assert set(out) == {"map", "precision_radius", "precision@5", "recall@5", "precision@30", "recall@30", "ndcg",
                        "acg", "wmap"}
    assert all(float(v) == want[k] for k, v in out.items())
    assert everything.details["num_queries"] == 11 and everything.details["num_database"] == 57  # repeats dropped


def test_map_matches_sklearn_average_precision():
    sk = pytest.importorskip("sklearn.metrics")
    # database item j has j bits set, the query none: every distance is distinct, so the ranking has no ties
    k = 12
    rng = np.random.default_rng(4)
    dc = np.array([[1] * j + [0] * (k - j) for j in range(k + 1)])[rng.permutation(k + 1)]
    dl = rng.integers(0, 3, k + 1)
    ql = np.array([0, 1, 2])
    qc = np.zeros((3, k), dtype=np.int64)
    aps = [sk.average_precision_score((dl == c).astype(int), -dc.sum(1)) for c in ql if (dl == c).any()]
    metric = HammingMAP(empty_queries="skip")
    _feed(metric, qc, dc, ql, dl)
    assert float(metric.compute()) == pytest.approx(float(np.mean(aps)), abs=1e-12)


def test_activations_are_binarised_with_the_threshold():
    qc, dc, ql, dl = _case(5, multilabel=False)
    want = retrieval_metrics(qc, dc, ql, dl)["map"]
    rng = np.random.default_rng(0)
    soft = [np.where(c > 0, 0.5 + rng.random(c.shape) / 2.1, rng.random(c.shape) / 2.1) for c in (qc, dc)]
    for codes, kw in (((qc, dc), {}), ((qc * 2 - 1, dc * 2 - 1), {}), (tuple(soft), {}),
                      ((soft[0] - 0.5, soft[1] - 0.5), {"threshold": 0.0})):
        metric = HammingMAP(**kw)
        _feed(metric, codes[0], codes[1], ql, dl)
        assert float(metric.compute()) == want


def test_errors_name_the_problem():
    with pytest.raises(TypeError, match="ndcg"):
        HammingRetrieval(ndcg=5)
    with pytest.raises(ValueError, match="wmap_topk is only supported with ties='stable'"):
        WeightedMAP(10, ties="average")
    metric = HammingMAP()
    with pytest.raises(ValueError, match="role"):
        metric.update(torch.zeros(2, 4), torch.zeros(2), torch.arange(2), role="db")
    with pytest.raises(ValueError, match="one row per item"):
        metric.update(torch.zeros(2, 4), torch.zeros(3), torch.arange(2))
    metric.update(torch.zeros(2, 4), torch.zeros(2), torch.arange(2), role="query")
    with pytest.raises(ValueError, match="no database items"):
        metric.compute()


def _ddp_worker(rank: int, world: int, init: str, case: dict, out: str) -> None:
    """One process: its DistributedSampler share of both sets (the short share padded with repeats)."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        metrics = [HammingRetrieval(**OPTIONS)] + [m for m, _ in _named()]
        collector = CodeCollector(0.5)  # what the plot callback gathers, through the same metric state
        for loader_idx, role in enumerate(("query", "database")):
            codes, labels = np.asarray(case[f"{role}_codes"]), np.asarray(case[f"{role}_labels"])
            idx = np.array(list(DistributedSampler(range(len(codes)), num_replicas=world, rank=rank, shuffle=True,
                                                   seed=1)))
            for b in np.array_split(idx, 2):
                for m in metrics:
                    m.update(torch.as_tensor(codes[b]), torch.as_tensor(labels[b]), torch.as_tensor(b), role=role)
                collector.add(torch.as_tensor(codes[b]), (None, torch.as_tensor(labels[b]), b), loader_idx)
        trainer = SimpleNamespace(world_size=world)
        values = {"all": {k: float(v) for k, v in metrics[0].compute().items()},
                  "named": [float(m.compute()) for m in metrics[1:]], "details": metrics[0].details,
                  "collected": [[t.tolist() for t in collector.gathered(trainer, i)] for i in (0, 1)]}
        Path(out, f"rank{rank}.json").write_text(json.dumps(values))
    finally:
        dist.destroy_process_group()


def test_two_processes_give_the_values_of_one(tmp_path):
    # 11 queries and 57 database items do not split evenly over 2 processes: the sampler repeats items
    qc, dc, ql, dl = _case(7)
    case = {"query_codes": qc.tolist(), "database_codes": dc.tolist(), "query_labels": ql.tolist(),
            "database_labels": dl.tolist()}
    mp.spawn(_ddp_worker, args=(2, f"file://{tmp_path / 'init'}", case, str(tmp_path)), nprocs=2, join=True)
    one = HammingRetrieval(**OPTIONS)
    named = _named()
    for m in [one] + [m for m, _ in named]:
        _feed(m, qc, dc, ql, dl, repeat=False)
    want = {k: float(v) for k, v in one.compute().items()}
    for rank in range(2):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["all"] == want  # exactly: the same items in the same order reach the same engine
        assert got["named"] == [float(m.compute()) for m, _ in named]
        assert got["details"]["num_queries"] == 11 and got["details"]["num_database"] == 57
        assert got["collected"] == [[qc.tolist(), ql.tolist()], [dc.tolist(), dl.tolist()]]  # each item once, in order


def _readme_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("\n## Metrics"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's Metrics section has no python example"
    return next(b for b in blocks if "HammingMAP" in b)


def test_readme_lightning_module_example_trains_and_logs_hamming_map():
    """The README's example, run as written: a plain LightningModule logs HammingMAP in validation."""
    scope: dict = {"__name__": "readme_example"}
    exec(compile(_readme_example(), "README.md (Metrics example)", "exec"), scope)
    trainer, model = scope["trainer"], scope["model"]
    assert trainer.global_step == 30
    logged = float(trainer.callback_metrics["val/map"])
    # the logged value is MAP of the trained model's codes on the two validation sets
    val_loaders = trainer.val_dataloaders
    with torch.no_grad():
        (qx, qy, _), (dx, dy, _) = (loader.dataset.tensors for loader in val_loaders)
        qc, dc = (torch.sigmoid(model.net(x)) > 0.5 for x in (qx, dx))
    assert logged == pytest.approx(retrieval_metrics(qc.to(torch.uint8), dc.to(torch.uint8), qy, dy)["map"],
                                   abs=1e-6)
    assert logged > 0.5  # four well-separated classes: training gives codes that rank them


def test_eval_config_cutoffs_are_checked_when_the_callback_is_built():
    from omegaconf import OmegaConf

    from dsrh_lightning.config import ConfigError, load_config
    from dsrh_lightning.lightning.callbacks.retrieval import RetrievalEvaluation

    cfg = load_config(["dataset=synthetic"]).eval
    assert RetrievalEvaluation(cfg).metric.options == {"topk": None, "radius": 2, "precision_at": (100, 1000),
                                                       "ndcg_k": None, "acg_k": None, "wmap_topk": None}
    bad = OmegaConf.merge(OmegaConf.to_container(cfg), {"acg_k": -3})  # an eval section that skipped validation
    with pytest.raises(ConfigError, match=r"eval\.acg_k=-3"):
        RetrievalEvaluation(bad)


def test_batch_local_indexes_are_refused_naming_the_role_and_index():
    """arange(b) in every batch would keep only the first batch's items: refused, where padding
    (the same item repeated, identical codes and labels) is still dropped silently."""
    qc, dc, ql, dl = _case(3, nq=20, nd=40, multilabel=False)
    metric = HammingMAP()
    for role, codes, labels in (("query", qc, ql), ("database", dc, dl)):
        for start in range(0, len(codes), 10):
            b = slice(start, start + 10)
            metric.update(torch.as_tensor(codes[b]), torch.as_tensor(labels[b]), torch.arange(10), role=role)
    with pytest.raises(ValueError, match=r"query index \d+ is given twice with different (codes|labels)") as info:
        metric.compute()
    # the first clashing index: the smallest of 0..9 whose rows 0-9 and 10-19 differ in codes or labels
    clash = [i for i in range(10) if (qc[i] != qc[10 + i]).any() or ql[i] != ql[10 + i]]
    assert f"query index {clash[0]} " in str(info.value)
    # a database-only clash names the database
    metric = HammingMAP()
    metric.update(torch.as_tensor(qc), torch.as_tensor(ql), torch.arange(len(qc)), role="query")
    metric.update(torch.as_tensor(dc[:2]), torch.tensor([0, 1]), torch.tensor([5, 5]), role="database")
    with pytest.raises(ValueError, match=r"database index 5 is given twice with different"):
        metric.compute()


@pytest.mark.parametrize("key, value, says", [
    ("topk", 2.5, "must be a positive integer"), ("ndcg_k", "ten", "must be a positive integer"),
    ("precision_at", [10, 2.5], "eval.precision_at=[10, 2.5]"), ("radius", 1.5, "radius"),
    ("wmap_topk", -1, "must be >= 0"),
])
def test_every_eval_cutoff_error_names_its_eval_key(key, value, says):
    from omegaconf import OmegaConf

    from dsrh_lightning.config import ConfigError, load_config
    from dsrh_lightning.lightning.callbacks.retrieval import RetrievalEvaluation

    cfg = OmegaConf.to_container(load_config(["dataset=synthetic"]).eval)
    bad = OmegaConf.create({**cfg, key: value})  # an eval section that skipped validation
    with pytest.raises(ConfigError) as info:
        RetrievalEvaluation(bad)
    assert str(info.value).startswith(f"eval.{key}=") and says in str(info.value), str(info.value)


def test_wmap_with_average_ties_names_the_eval_key():
    from omegaconf import OmegaConf

    from dsrh_lightning.config import ConfigError, load_config
    from dsrh_lightning.lightning.callbacks.retrieval import RetrievalEvaluation

    cfg = OmegaConf.to_container(load_config(["dataset=synthetic"]).eval)
    with pytest.raises(ConfigError, match=r"^eval\.wmap_topk=5: .*ties='stable'"):
        RetrievalEvaluation(OmegaConf.create({**cfg, "wmap_topk": 5, "ties": "average"}))
