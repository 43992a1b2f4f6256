"""A thin ``torchmetrics.Metric`` around :func:`retrieval_metrics` (state concatenated across processes)."""

from __future__ import annotations

import torch
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .codes import codes_to_bits
from .retrieval import retrieval_metrics

__all__ = ["RetrievalEvaluator"]


class RetrievalEvaluator(Metric):
    """Collect query and database codes/labels; ``compute()`` returns :func:`retrieval_metrics`.

    ``update(codes (n, k), labels (n,) or (n, c), is_query)``; codes in {0,1} or {-1,+1}.
    Keyword arguments are passed to :func:`retrieval_metrics`. Under DDP each state is
    gathered with ``dist_reduce_fx="cat"``.
    """

    full_state_update = False

    def __init__(self, **metric_kwargs) -> None:
        super().__init__()
        self.metric_kwargs = metric_kwargs
        for name in ("query_codes", "query_labels", "db_codes", "db_labels"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, codes: torch.Tensor, labels: torch.Tensor, is_query: bool) -> None:  # type: ignore[override]
        bits = codes_to_bits(codes, "codes")
        labels = torch.as_tensor(labels)
        if labels.shape[0] != bits.shape[0]:
            raise ValueError(f"labels has {labels.shape[0]} rows but codes has {bits.shape[0]}")
        if is_query:
            self.query_codes.append(bits)
            self.query_labels.append(labels)
        else:
            self.db_codes.append(bits)
            self.db_labels.append(labels)

    def update_query(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        self.update(codes, labels, True)

    def update_database(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        self.update(codes, labels, False)

    def compute(self) -> dict:  # type: ignore[override]
        if not self.query_codes or not self.db_codes:
            raise ValueError("RetrievalEvaluator needs at least one query and one database update")
        return retrieval_metrics(
            dim_zero_cat(self.query_codes),
            dim_zero_cat(self.db_codes),
            dim_zero_cat(self.query_labels),
            dim_zero_cat(self.db_labels),
            **self.metric_kwargs,
        )
