"""Retrieval evaluation: encode queries and database, binarise, rank by Hamming distance, log metrics.

Validation and test loaders come in pairs (queries first, database second). The
callback collects the codes the module returns for each batch, and at epoch end
computes the metrics with :func:`dsrh_lightning.metrics.retrieval_metrics` and
logs them as ``val/...`` or ``test/...`` (``val/map`` drives checkpoint selection).

Under DDP each rank encodes a share of the items (a ``DistributedSampler`` that
pads the last share by repeating items). At epoch end the callback gathers codes,
labels and item positions (``batch[2]``) from all ranks, drops the repeated
positions and restores the subset order, so every rank computes the metrics of
exactly the items a single process would see: MAP on N processes equals MAP on one.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from ...metrics import binarize, retrieval_metrics

__all__ = ["CodeCollector", "RetrievalEvaluation", "all_gather_cat", "dedupe_by_position"]


def all_gather_cat(trainer: pl.Trainer, x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (rows may differ per rank) over all ranks, rank 0 first; ``x`` itself on one process."""
    world = trainer.world_size
    if world == 1:
        return x
    strategy = trainer.strategy
    sizes = strategy.all_gather(torch.tensor([x.shape[0]], device=strategy.root_device)).view(-1).tolist()
    longest = max(int(n) for n in sizes)
    padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype, device=strategy.root_device)
    padded[: x.shape[0]] = x.to(strategy.root_device)
    gathered = strategy.all_gather(padded).view(world, longest, *x.shape[1:])
    return torch.cat([gathered[r, : int(sizes[r])] for r in range(world)]).cpu()


def dedupe_by_position(positions: torch.Tensor, *tensors: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Keep the first row of each position and sort rows by position.

    Removes the items a distributed sampler repeats to pad the ranks' shares, and
    restores the dataset order. Returns ``(positions, *tensors)`` reindexed.
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
    sel = order[keep]
    return (positions[sel],) + tuple(t[sel] for t in tensors)


class CodeCollector:
    """Binarised codes, labels and item positions of an evaluation loader pair (0 = queries, 1 = database),
    gathered over all ranks with the distributed padding dropped (used by the evaluation and plot callbacks)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.reset()

    def reset(self) -> None:
        self._codes: List[List[torch.Tensor]] = [[], []]
        self._labels: List[List[torch.Tensor]] = [[], []]
        self._positions: List[List[torch.Tensor]] = [[], []]

    def add(self, outputs: torch.Tensor, batch, loader_idx: int) -> None:
        self._codes[loader_idx].append(binarize(outputs.detach().float(), self.threshold).cpu())
        self._labels[loader_idx].append(batch[1].detach().cpu())
        self._positions[loader_idx].append(torch.as_tensor(batch[2]).detach().cpu().long())

    def complete(self) -> bool:
        """True when both queries and database were seen."""
        return bool(self._codes[0]) and bool(self._codes[1])

    def gathered(self, trainer: pl.Trainer, loader_idx: int) -> Sequence[torch.Tensor]:
        """``(codes, labels)`` of every item once, in dataset order (every rank must call this)."""
        codes, labels = torch.cat(self._codes[loader_idx]), torch.cat(self._labels[loader_idx])
        positions = torch.cat(self._positions[loader_idx])
        if trainer.world_size > 1:
            codes, labels, positions = (all_gather_cat(trainer, t) for t in (codes, labels, positions))
        _, codes, labels = dedupe_by_position(positions, codes, labels)
        return codes, labels


class RetrievalEvaluation(pl.Callback):
    def __init__(self, eval_cfg: DictConfig, step: Optional[int] = None) -> None:
        self.cfg = eval_cfg
        self.step = step  # the step printed after a test (default: the loaded checkpoint's, else the trainer's)
        self.last: Dict[str, Dict[str, Any]] = {}
        # Items evaluated in the last epoch (after gathering and dropping distributed padding).
        self.counts: Dict[str, int] = {}
        self.collector = CodeCollector(eval_cfg.threshold)
        self._loaded_step = None

    def _finish(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        col = self.collector
        if trainer.sanity_checking or not col.complete():
            col.reset()
            return
        (q_codes, q_labels), (db_codes, db_labels) = col.gathered(trainer, 0), col.gathered(trainer, 1)
        col.reset()
        self.counts = {"queries": int(q_codes.shape[0]), "database": int(db_codes.shape[0])}
        topk = self.cfg.topk or None
        metrics = retrieval_metrics(
            q_codes, db_codes, q_labels, db_labels,
            topk=topk, radius=self.cfg.radius, precision_at=tuple(self.cfg.precision_at),
            ties=self.cfg.ties, empty_queries=self.cfg.empty_queries,
            ndcg_k=self.cfg.ndcg_k or None, acg_k=self.cfg.acg_k or None, wmap_topk=self.cfg.wmap_topk or None,
        )
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

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self.collector.reset()

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.collector.reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collector.add(outputs, batch, dataloader_idx)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.collector.add(outputs, batch, dataloader_idx)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        self._finish(trainer, pl_module, "test")
