"""The LightningModule: wires the network, the ranking method and its miner (built from the config by
losses/from_config.py), the orthogonality / balance / classification terms and the optimiser."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from ..losses.classification import classification_loss
from ..losses.orthogonality import orthogonality_penalty
from ..config import upgrade_legacy_config
from ..losses.base import RankingResult
from ..losses.from_config import build_miner, build_ranking_loss
from ..losses.semantic_ranking import balance_penalty
from ..models import build_network
from ..seeding import SLOT_STEP, item_seed, seed_device

__all__ = ["HashingModule", "combine_losses"]


def combine_losses(ranking: torch.Tensor, orth_matrices: List[torch.Tensor], codes: torch.Tensor,
                   logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                   loss_cfg: DictConfig) -> Dict[str, torch.Tensor]:
    """The objective: ``w_r * ranking + lambda * orth + w_b * balance + w_c * classification``.

    Args:
        ranking: scalar ranking term of the method (``w_r`` = ``loss.ranking_weight``).
        orth_matrices: code matrices the orthogonality penalty averages over.
        codes: ``(b, k)`` all codes of the batch (for the balance penalty).
        logits, labels: classification stream output ``(b, c)`` and its labels (or None).

    Returns:
        dict with ``loss`` (total) and each active term.
    """
    out: Dict[str, torch.Tensor] = {"ranking": ranking}
    total = loss_cfg.ranking_weight * ranking
    if loss_cfg.orth_weight > 0:
        out["orth"] = orthogonality_penalty(orth_matrices, loss_cfg.orth_norm)
        total = total + loss_cfg.orth_weight * out["orth"]
    if loss_cfg.balance_weight > 0:
        out["balance"] = balance_penalty(codes)
        total = total + loss_cfg.balance_weight * out["balance"]
    if logits is not None and labels is not None and loss_cfg.cls_weight > 0:
        out["cls"] = classification_loss(logits, labels)
        total = total + loss_cfg.cls_weight * out["cls"]
    out["loss"] = total
    return out


def _rename_legacy_keys(state_dict, prefix, *args) -> None:
    """Checkpoints written before the ranking methods became modules kept CSQ's centres at ``csq_centers``."""
    old = prefix + "csq_centers"
    if old in state_dict:
        state_dict[prefix + "ranking.centers"] = state_dict.pop(old)


class HashingModule(pl.LightningModule):
    """DSRH training. ``forward(x)`` returns relaxed codes ``(b, bits)`` in (0, 1)."""

    def __init__(self, config: Dict[str, Any], num_classes: int, multilabel: bool = False,
                 feature_dim: Optional[int] = None, feature_stats: Optional[tuple] = None) -> None:
        super().__init__()
        # The resolved config becomes the run's hyperparameters (logged to W&B, stored in checkpoints);
        # the feature statistics travel as buffers of the network instead.
        self.save_hyperparameters(ignore=["feature_stats"])
        # A config saved by an older version (a checkpoint's hyperparameters) is read with today's key names.
        self.cfg: DictConfig = OmegaConf.create(upgrade_legacy_config(config))
        # feature_dim: inputs are cached backbone features (data.cache_features), the backbone is the identity
        # or, with data.feature_norm=standardize, a fixed standardisation by feature_stats = (mean, std).
        standardize = bool(feature_dim) and self.cfg.data.get("feature_norm", "none") == "standardize"
        self.net = build_network(self.cfg.model, num_classes, feature_dim, standardize=standardize,
                                 cache_features=bool(self.cfg.data.cache_features), seed=int(self.cfg.seed))
        if feature_stats is not None:
            if not standardize:
                raise ValueError("feature_stats given, but the config does not standardise cached features")
            self.net.backbone.set_statistics(*feature_stats)
        self._mine_gen = torch.Generator().manual_seed(int(self.cfg.seed))
        # The ranking method (loss.ranking): owns its settings, buffers and schedules; the miner chooses the
        # triplets of a triplet loss (explicit triplets, or loss.triplet_mining inside the batch).
        self.ranking = build_ranking_loss(self.cfg, num_classes)
        self.miner = build_miner(self.cfg, self.ranking)
        self._explicit = self.cfg.data.sampling == "triplets"
        self._register_load_state_dict_pre_hook(_rename_legacy_keys)
        # NaN guard state (see training_step): first non-finite step (-1 = none) and its loss values.
        self._bad_step = torch.tensor(-1)
        self._bad_values: Optional[torch.Tensor] = None
        self._bad_keys: List[str] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["codes"]

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and hasattr(dm, "set_epoch"):
            dm.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        # Dropout and in-batch mining draw from generators seeded by (seed, step, rank): the random
        # numbers of step t do not depend on what ran before, so a resumed run matches an uninterrupted one.
        step_seed = item_seed(int(self.cfg.seed), self.global_step, self.global_rank, slot=SLOT_STEP)
        seed_device(step_seed, self.device)
        self._mine_gen.manual_seed(step_seed)

    def _note_finite(self, losses: Dict[str, torch.Tensor]) -> None:
        """Record, on the device, the first step whose loss is not finite (no host synchronisation)."""
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()])
        if self._bad_step.device != values.device:
            self._bad_step = self._bad_step.to(values.device)
        bad = ~torch.isfinite(values[-1])
        first = bad & (self._bad_step < 0)
        self._bad_step = torch.where(first, torch.full_like(self._bad_step, self.global_step), self._bad_step)
        self._bad_values = values if self._bad_values is None else torch.where(first, values, self._bad_values)
        self._bad_keys = list(losses)

    def check_finite(self) -> None:
        """Raise ``FloatingPointError`` if a loss since the start was not finite (one host sync; every rank
        decides together, so no rank is left waiting)."""
        if self._bad_values is None:
            return
        bad_step = int(self._bad_step)
        finite = bad_step < 0
        if self._trainer is not None and self.trainer.world_size > 1:
            # Stop every rank together (a rank that stopped alone would leave the others waiting).
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            where = f"step {bad_step}" if bad_step >= 0 else "another rank"
            values = ", ".join(f"{k}={v:.4g}" for k, v in zip(self._bad_keys, self._bad_values.tolist()))
            raise FloatingPointError(
                f"non-finite loss at {where}: {values if bad_step >= 0 else '(see that rank)'}"
                "; lower optim.lr or check the input data. The last checkpoint is kept.")

    def _check_due(self) -> bool:
        """Check finiteness after this step when the step's end logs or writes a periodic checkpoint,
        or is the last step (validation and every checkpoint save check as well)."""
        done = self.global_step + 1
        t = self.cfg.trainer
        return any(n > 0 and done % n == 0 for n in (int(t.log_every_n_steps), int(t.checkpoint_every_n_steps))) \
            or (int(t.max_steps) > 0 and done >= int(t.max_steps))

    def ranking_terms(self, out: Dict[str, torch.Tensor], labels: torch.Tensor, step: int) -> RankingResult:
        """The ranking method's result on network outputs ``out`` of ``b`` rows and their ``labels``
        (``(b,)`` / ``(b, c)``), its triplets chosen by the miner."""
        triplets = None
        if self.miner is not None:
            triplets = self.miner(out["codes"], labels, generator=self._mine_gen)
        return self.ranking(out, labels, triplets, step=step)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        if self._explicit:  # explicit triplets arrive as (b, 3, C, H, W): rows query, positive, negative
            images, labels = images.flatten(0, 1), labels.flatten(0, 1)
        out = self.net(images)
        r = self.ranking_terms(out, labels, self.global_step)
        losses = combine_losses(r.loss, r.orth, r.codes, out["logits"], r.labels, self.cfg.loss)
        # NaN guard without a per-step host sync: a device-side flag, checked when a sync happens anyway.
        self._note_finite(losses)
        if self._check_due():
            self.check_finite()
        self.log("loss", losses["loss"].detach(), prog_bar=True, on_step=True, logger=False)
        if self._logs_due():  # step metrics reach the logger on log steps only: skip the bookkeeping between
            for k, v in r.extras.items():
                self.log(f"train/{k}", v, on_step=True)
            self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True)
            self.log("train/bit_balance", (r.codes.detach().float().mean(0) - 0.5).abs().mean(), on_step=True)
        return losses["loss"]

    def _logs_due(self) -> bool:
        """Whether Lightning writes step metrics after this step (every ``trainer.log_every_n_steps``):
        each ``self.log`` call goes through Lightning's result bookkeeping, so steps that log nothing skip them."""
        connector = getattr(self._trainer, "_logger_connector", None)
        return True if connector is None else bool(connector.should_update_logs)

    def on_validation_start(self) -> None:
        self.check_finite()

    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        self.check_finite()

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def test_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(batch[0])

    def configure_optimizers(self):
        o = self.cfg.optim
        backbone = [p for p in self.net.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in backbone}
        heads = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": heads, "lr": o.lr}]
        if backbone:
            groups.append({"params": backbone, "lr": o.lr * o.backbone_lr_mult})
        opt = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=o.lr_decay_steps, gamma=o.lr_decay)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
