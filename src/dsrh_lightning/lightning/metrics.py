"""Hamming-ranking retrieval metrics as torchmetrics ``Metric`` classes, for any LightningModule.

A retrieval metric needs two sets: queries and a database. Feed both through :meth:`HammingRetrieval.update`
with ``role="query"`` or ``role="database"``, each item with its index in its own set; :meth:`compute`
ranks the database by Hamming distance for every query with
:func:`dsrh_lightning.metrics.retrieval_metrics` (the numba engine on CPU) and returns the metrics.

State is kept as lists (codes as uint8 bits), synchronised by concatenation across processes. Items are
then deduplicated by index and put in index order, so the items a ``DistributedSampler`` repeats to pad
the ranks' shares are counted once: N processes give the values of one.

``HammingRetrieval`` returns a dict of every metric its options ask for; ``HammingMAP``,
``PrecisionWithinRadius``, ``PrecisionAtK``, ``RecallAtK``, ``HammingNDCG``, ``HammingACG`` and
``WeightedMAP`` return one value each.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from ..metrics import binarize, retrieval_metrics
from ..metrics.specs import METRICS, MetricSpec, plan_metrics

__all__ = ["HammingRetrieval", "HammingMAP", "PrecisionWithinRadius", "PrecisionAtK", "RecallAtK", "HammingNDCG",
           "HammingACG", "WeightedMAP", "dedupe_by_position"]

_ROLES = ("query", "database")


def dedupe_by_position(positions: torch.Tensor, *tensors: torch.Tensor, names: Sequence[str] = (),
                       role: str = "item") -> Tuple[torch.Tensor, ...]:
    """Keep the first row of each position and sort rows by position.

    Removes the items a distributed sampler repeats to pad the ranks' shares (the same item: identical
    rows), and restores the dataset order. Returns ``(positions, *tensors)`` reindexed. Rows that share a
    position but differ in any tensor (e.g. batch-local indexes, ``arange(b)`` in every batch) raise
    ``ValueError`` naming ``role``, the tensor (``names[i]``, else its number) and the first such position.
    """
    if positions.ndim != 1:
        raise ValueError(f"positions must be 1-D, got shape {tuple(positions.shape)}")
    for t in tensors:
        if t.shape[0] != positions.shape[0]:
            raise ValueError(f"a tensor has {t.shape[0]} rows but there are {positions.shape[0]} positions")
    order = torch.argsort(positions, stable=True)
    sorted_pos = positions[order]
    keep = torch.ones_like(sorted_pos, dtype=torch.bool)
    keep[1:] = sorted_pos[1:] != sorted_pos[:-1]
    repeat = ~keep[1:]
    if bool(repeat.any()):
        later, earlier = order[1:][repeat], order[:-1][repeat]
        for i, t in enumerate(tensors):
            differ = (t[later] != t[earlier]).reshape(later.shape[0], -1).any(1)
            if bool(differ.any()):
                name = names[i] if i < len(names) else f"tensor {i}"
                first = int(positions[later[differ]].min())
                raise ValueError(
                    f"{role} index {first} is given twice with different {name}: each {role} item needs its own "
                    "index in its set (e.g. its dataset position, not its position in the batch); only "
                    "identical repeats (a distributed sampler's padding) are dropped")
    sel = order[keep]
    return (positions[sel],) + tuple(t[sel] for t in tensors)


class HammingRetrieval(Metric):
    """Hamming-ranking retrieval metrics of a query set against a database.

    Args:
        threshold: codes are binarised as ``code > threshold`` (sigmoid outputs, {0,1} and {-1,+1} codes
            all work with the default 0.5; use 0 for tanh outputs).
        ties, empty_queries, engine, specs: as in :func:`~dsrh_lightning.metrics.retrieval_metrics`.
        compute_on: device the metrics are computed on; ``"cpu"`` (default: the numba engine) or None
            (where the states are).
        **options: the metrics' cut-offs, as in ``retrieval_metrics`` (``topk``, ``radius``,
            ``precision_at``, ``ndcg_k``, ``acg_k``, ``wmap_topk``); checked here against a large database.
        Other torchmetrics keyword arguments (``process_group``, ``sync_on_compute``, ...) go in
        ``metric_kwargs``.

    ``compute()`` returns ``{name: 0-d float64 tensor}`` for every per-query metric; the full result of
    ``retrieval_metrics`` (item counts, cut-offs, PR curve) is kept in :attr:`details`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, *, threshold: float = 0.5, ties: str = "stable", empty_queries: str = "zero",
                 engine: str = "auto", specs: Sequence[MetricSpec] = METRICS, compute_on: str | None = "cpu",
                 metric_kwargs: Dict[str, Any] | None = None, **options) -> None:
        super().__init__(**(metric_kwargs or {}))
        plan_metrics(1 << 30, ties, options, specs=specs)  # unknown or bad options fail here, not at compute
        self.threshold = float(threshold)
        self.ties, self.empty_queries, self.engine = ties, empty_queries, engine
        self.specs, self.options, self.compute_on = tuple(specs), dict(options), compute_on
        self.details: Dict[str, Any] = {}
        for role in _ROLES:
            for part in ("codes", "labels", "indexes"):
                self.add_state(f"{role}_{part}", default=[], dist_reduce_fx="cat")

    def update(self, codes: torch.Tensor, labels: torch.Tensor, indexes: torch.Tensor, role: str = "query") -> None:
        """Add a batch of one set.

        Args:
            codes: ``(b, k)`` code activations or codes (binarised with ``threshold``).
            labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
            indexes: ``(b,)`` each item's index in its set (repeated indexes are counted once).
            role: ``"query"`` or ``"database"``.
        """
        if role not in _ROLES:
            raise ValueError(f"role must be 'query' or 'database', got {role!r}")
        codes, labels, indexes = (torch.as_tensor(x) for x in (codes, labels, indexes))
        if codes.ndim != 2:
            raise ValueError(f"codes must be (batch, bits), got shape {tuple(codes.shape)}")
        if indexes.ndim != 1 or labels.shape[0] != codes.shape[0] or indexes.shape[0] != codes.shape[0]:
            raise ValueError(f"codes, labels and indexes need one row per item: got {codes.shape[0]}, "
                             f"{labels.shape[0]} and {tuple(indexes.shape)}")
        getattr(self, f"{role}_codes").append(binarize(codes.detach().float(), self.threshold))
        getattr(self, f"{role}_labels").append(labels.detach())
        getattr(self, f"{role}_indexes").append(indexes.detach().long())

    def gathered(self, role: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(codes, labels)`` of every item of ``role`` once, in index order (after synchronisation)."""
        codes = getattr(self, f"{role}_codes")
        if isinstance(codes, list) and not codes:
            raise ValueError(f"{type(self).__name__}: no {role} items were given to update()")
        codes, labels, indexes = (dim_zero_cat(getattr(self, f"{role}_{p}")) for p in ("codes", "labels", "indexes"))
        _, codes, labels = dedupe_by_position(indexes, codes, labels, names=("codes", "labels"), role=role)
        return codes, labels

    def _results(self) -> Dict[str, Any]:
        (qc, ql), (dc, dl) = self.gathered("query"), self.gathered("database")
        if self.compute_on is not None:
            qc, ql, dc, dl = (t.to(self.compute_on) for t in (qc, ql, dc, dl))
        self.details = retrieval_metrics(qc, dc, ql, dl, ties=self.ties, empty_queries=self.empty_queries,
                                         engine=self.engine, specs=self.specs, **self.options)
        return self.details

    def compute(self) -> Dict[str, torch.Tensor]:
        res = self._results()
        keys = [e.key for e in plan_metrics(int(res["num_database"]), self.ties, self.options, specs=self.specs).entries]
        return {k: torch.tensor(res[k], dtype=torch.float64) for k in keys}


class _OneMetric(HammingRetrieval):
    """A :class:`HammingRetrieval` that returns one of its values."""

    _key = ""

    def compute(self) -> torch.Tensor:
        return torch.tensor(self._results()[self._key], dtype=torch.float64)


class HammingMAP(_OneMetric):
    """Mean average precision over the top ``topk`` of the Hamming ranking (None = the whole database)."""

    _key = "map"

    def __init__(self, topk: int | None = None, **kwargs) -> None:
        super().__init__(topk=topk, **kwargs)


class PrecisionWithinRadius(_OneMetric):
    """Mean over queries of the precision of the items within Hamming distance ``radius`` (0 when none)."""

    _key = "precision_radius"

    def __init__(self, radius: int = 2, **kwargs) -> None:
        super().__init__(radius=radius, **kwargs)


class PrecisionAtK(_OneMetric):
    """Mean precision of the top ``k`` of the Hamming ranking."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(precision_at=(k,), **kwargs)
        self._key = f"precision@{k}"


class RecallAtK(_OneMetric):
    """Mean recall of the top ``k`` of the Hamming ranking."""

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(precision_at=(k,), **kwargs)
        self._key = f"recall@{k}"


class HammingNDCG(_OneMetric):
    """NDCG@k with the number of shared labels as graded relevance."""

    _key = "ndcg"

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(ndcg_k=k, **kwargs)


class HammingACG(_OneMetric):
    """Mean number of shared labels over the top ``k``."""

    _key = "acg"

    def __init__(self, k: int, **kwargs) -> None:
        super().__init__(acg_k=k, **kwargs)


class WeightedMAP(_OneMetric):
    """Weighted MAP@K: mean over relevant positions ``p <= topk`` of ACG@p (stable ties only)."""

    _key = "wmap"

    def __init__(self, topk: int, **kwargs) -> None:
        super().__init__(wmap_topk=topk, **kwargs)
