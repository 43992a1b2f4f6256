"""Retrieval evaluation: encode queries and database, binarise, rank by Hamming distance, log metrics.

Validation and test loaders come in pairs (queries first, database second). The
callback feeds the codes the module returns for each batch, with the labels and
item positions (``batch[1]``, ``batch[2]``), to a
:class:`~dsrh_lightning.lightning.metrics.HammingRetrieval` metric built from the
``eval`` config, and at epoch end logs every value of
:func:`dsrh_lightning.metrics.retrieval_metrics` as ``val/...`` or ``test/...``
(``val/map`` drives checkpoint selection).

Under DDP each rank encodes a share of the items (a ``DistributedSampler`` that
pads the last share by repeating items). The metric gathers codes, labels and item
positions from all ranks and drops the repeated positions, so every rank computes
the metrics of exactly the items a single process would see: MAP on N processes
equals MAP on one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ...config import ConfigError
from ...metrics.specs import metric_options, options_from, plan_metrics
from ..metrics import HammingRetrieval, dedupe_by_position

__all__ = ["CodeCollector", "RetrievalEvaluation", "dedupe_by_position"]

_ROLES = ("query", "database")  # the evaluation loader pair, by dataloader index


class CodeCollector:
    """Codes (binarised), labels and item positions (``batch[2]``) of an evaluation loader pair (0 = queries,
    1 = database), kept by a :class:`HammingRetrieval` metric on the module's device (used by the evaluation
    and plot callbacks)."""

    def __init__(self, threshold: float = 0.5, metric: Optional[HammingRetrieval] = None) -> None:
        self.metric = metric if metric is not None else HammingRetrieval(threshold=threshold)

    def reset(self) -> None:
        self.metric.reset()

    def add(self, outputs: torch.Tensor, batch, loader_idx: int) -> None:
        self.metric.update(outputs, batch[1], torch.as_tensor(batch[2]), role=_ROLES[loader_idx])

    def complete(self) -> bool:
        """True when both queries and database were seen."""
        return bool(self.metric.query_codes) and bool(self.metric.database_codes)

    def gathered(self, trainer: pl.Trainer, loader_idx: int) -> Sequence[torch.Tensor]:
        """``(codes, labels)`` of every item once, in dataset order, on the CPU (every rank must call this)."""
        with self.metric.sync_context(should_sync=trainer.world_size > 1):
            codes, labels = self.metric.gathered(_ROLES[loader_idx])
        return codes.cpu(), labels.cpu()


class RetrievalEvaluation(pl.Callback):
    def __init__(self, eval_cfg: DictConfig, step: Optional[int] = None) -> None:
        self.cfg = eval_cfg
        self.step = step  # the step printed after a test (default: the loaded checkpoint's, else the trainer's)
        self.last: Dict[str, Dict[str, Any]] = {}
        # Items evaluated in the last epoch (after gathering and dropping distributed padding).
        self.counts: Dict[str, int] = {}
        # every metric option the eval config sets (0 = whole database / not computed), each checked alone so
        # that any error about it names its key (eval.<name>)
        for name in metric_options():
            value = eval_cfg.get(name)
            values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 0 for v in values):
                raise ConfigError(f"eval.{name}={value}: must be >= 0 (0 = the whole database or not computed)")
            try:
                plan_metrics(1 << 30, eval_cfg.ties, options_from(lambda n: value if n == name else None))
            except (TypeError, ValueError) as exc:
                text = str(exc)
                text = text[len(name):].lstrip(" :") if text.startswith(name) else text
                raise ConfigError(f"eval.{name}={value}: {text}") from None
        self.metric = HammingRetrieval(threshold=eval_cfg.threshold, ties=eval_cfg.ties,
                                       empty_queries=eval_cfg.empty_queries,
                                       **options_from(lambda name: eval_cfg.get(name)))
        self.collector = CodeCollector(metric=self.metric)
        self._loaded_step = None

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.sanity_checking or not self.collector.complete():
            self.metric.reset()
            return
        self.metric.compute()  # gathers all ranks' items (every rank must call this), then retrieval_metrics
        metrics = self.metric.details
        self.metric.reset()
        self.counts = {"queries": int(metrics["num_queries"]), "database": int(metrics["num_database"])}
        scalars = {f"{stage}/{k}": float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self.last[stage] = scalars
        pl_module.log_dict(scalars, prog_bar=False, logger=True, sync_dist=False)
        step = trainer.global_step
        if stage == "test":
            step = next((s for s in (self.step, self._loaded_step) if s is not None), step)
        pl_module.print(f"[{stage} step {step}] "
                        + "  ".join(f"{k.split('/')[1]}={v:.4f}" for k, v in scalars.items()
                                    if k.split('/')[1] in ("map", "precision_radius", "ndcg", "wmap")))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._loaded_step = None  # before Lightning restores a checkpoint of this fit/test call

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # trainer.test(ckpt_path=...) restores the weights, not the step counter: print the checkpoint's step.
        self._loaded_step = checkpoint.get("global_step")

    def _start(self, pl_module) -> None:
        # states live on the module's device, so the gather works with any backend (NCCL included)
        self.metric.reset()
        self.metric.to(pl_module.device)

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._start(pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collector.add(outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collector.add(outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")
