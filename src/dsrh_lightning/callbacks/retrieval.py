"""Retrieval evaluation: encode queries and database, binarise, rank by Hamming distance, log metrics.

Validation and test loaders come in pairs (queries first, database second). The
callback collects the codes the module returns for each batch, and at epoch end
computes the metrics with :func:`dsrh_lightning.metrics.retrieval_metrics` and
logs them as ``val/...`` or ``test/...`` (``val/map`` drives checkpoint selection).
"""

from __future__ import annotations

from typing import Any, Dict, List

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ..metrics import binarize, retrieval_metrics

__all__ = ["RetrievalEvaluation"]


class RetrievalEvaluation(pl.Callback):
    def __init__(self, eval_cfg: DictConfig) -> None:
        self.cfg = eval_cfg
        self.last: Dict[str, Dict[str, Any]] = {}
        self._reset()

    def _reset(self) -> None:
        self._codes: List[List[torch.Tensor]] = [[], []]
        self._labels: List[List[torch.Tensor]] = [[], []]

    def _collect(self, outputs, batch, dataloader_idx: int) -> None:
        self._codes[dataloader_idx].append(binarize(outputs.detach().float(), self.cfg.threshold))
        self._labels[dataloader_idx].append(batch[1].detach())

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        codes, labels = self._codes, self._labels
        self._reset()
        if trainer.sanity_checking or not codes[0] or not codes[1]:
            return
        topk = self.cfg.topk or None
        metrics = retrieval_metrics(
            torch.cat(codes[0]), torch.cat(codes[1]), torch.cat(labels[0]), torch.cat(labels[1]),
            topk=topk, radius=self.cfg.radius, precision_at=tuple(self.cfg.precision_at),
            ties=self.cfg.ties, empty_queries=self.cfg.empty_queries,
            ndcg_k=self.cfg.ndcg_k or None, acg_k=self.cfg.acg_k or None, wmap_topk=self.cfg.wmap_topk or None,
        )
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.last[stage] = scalars
        pl_module.log_dict(scalars, prog_bar=False, logger=True, sync_dist=False)
        pl_module.print(f"[{stage} step {trainer.global_step}] "
                        + "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scalars.items()
                                    if k.split('/')[1] in ("map", "precision_radius", "ndcg", "wmap")))

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")
