"""The LightningModule: network + triplets (explicit or mined) + losses + optimiser."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf

from .seeding import SLOT_STEP, item_seed
from .data.sampling import mine_all_triplets, mine_multilevel_triplets
from .losses import (balance_penalty, classification_loss, effective_margin, orthogonality_penalty,
                     triplet_ranking_loss, weighted_ranking_loss)
from .losses.peers import PEER_LOSSES, csq_centers, csq_loss, dpsh_loss, dtsh_loss, hashnet_loss, hashnet_scale
from .models import build_network

__all__ = ["HashingModule", "combine_losses"]


def combine_losses(ranking: torch.Tensor, orth_matrices: List[torch.Tensor], codes: torch.Tensor,
                   logits: Optional[torch.Tensor], labels: Optional[torch.Tensor],
                   loss_cfg: DictConfig) -> Dict[str, torch.Tensor]:
    """The objective: ``w_t * ranking + lambda * orth + w_b * balance + w_c * classification``.

    Args:
        ranking: scalar ranking loss (triplet hinge or Zhao's weighted hinge).
        orth_matrices: code matrices the orthogonality penalty averages over.
        codes: ``(b, k)`` all codes of the batch (for the balance penalty).
        logits, labels: classification stream output ``(b, c)`` and its labels (or None).

    Returns:
        dict with ``loss`` (total) and each active term.
    """
    out: Dict[str, torch.Tensor] = {"ranking": ranking}
    total = loss_cfg.triplet_weight * ranking
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


class HashingModule(pl.LightningModule):
    """DSRH training. ``forward(x)`` returns relaxed codes ``(b, bits)`` in (0, 1)."""

    def __init__(self, config: Dict[str, Any], num_classes: int, multilabel: bool = False,
                 feature_dim: Optional[int] = None) -> None:
        super().__init__()
        # The resolved config becomes the run's hyperparameters (logged to W&B, stored in checkpoints).
        self.save_hyperparameters()
        self.cfg: DictConfig = OmegaConf.create(config)
        # feature_dim: inputs are cached backbone features (data.cache_features), the backbone is the identity.
        self.net = build_network(self.cfg.model, num_classes, feature_dim)
        self._mine_gen = torch.Generator().manual_seed(int(self.cfg.seed))
        if self.cfg.loss.ranking == "csq":
            self.register_buffer("csq_centers", csq_centers(num_classes, int(self.cfg.model.bits)))

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
        torch.manual_seed(step_seed)
        self._mine_gen.manual_seed(step_seed)

    def _peer(self, out, labels, images_per_item: int):
        """A peer method's loss (DPSH, DTSH, HashNet, CSQ) on all codes of the batch."""
        lc = self.cfg.loss
        codes = out["codes"]
        flat = labels.flatten(0, 1) if images_per_item == 3 else labels
        u = 2 * codes - 1
        if lc.ranking == "dpsh":
            loss = dpsh_loss(u, flat, lc.quant_weight)
        elif lc.ranking == "csq":
            loss = csq_loss(u, flat, self.csq_centers, lc.quant_weight)
        elif lc.ranking == "hashnet":
            beta = hashnet_scale(self.global_step, lc.hashnet_gamma, lc.hashnet_power)
            self.log("train/hashnet_beta", beta, on_step=True)
            loss = hashnet_loss(torch.tanh(beta * out["code_logits"].float()), flat, lc.hashnet_alpha or None)
        else:  # dtsh
            if images_per_item == 3:
                a = torch.arange(0, len(codes), 3, device=codes.device)
                p, n = a + 1, a + 2
            else:
                a, p, n = mine_all_triplets(flat, self.cfg.data.max_triplets, self._mine_gen)
            loss = dtsh_loss(u, a, p, n, lc.dtsh_margin, lc.quant_weight)
        return loss, [codes], codes, flat

    def _ranking(self, out, labels, images_per_item: int):
        """Ranking loss, the matrices for the orthogonality penalty, all codes, flat labels."""
        lc = self.cfg.loss
        if lc.ranking in PEER_LOSSES:
            return self._peer(out, labels, images_per_item)
        margin = effective_margin(lc.margin, self.cfg.model.bits, lc.margin_scaling)
        if images_per_item == 3:
            # Explicit triplets: rows are (query, positive, negative) of each triplet.
            codes = out["codes"].view(-1, 3, self.cfg.model.bits)
            q, p, n = codes[:, 0], codes[:, 1], codes[:, 2]
            return triplet_ranking_loss(q, p, n, margin), [q, p, n], out["codes"], labels.flatten(0, 1)
        codes = out["codes"]
        if lc.ranking == "weighted":
            q, i, j, w = mine_multilevel_triplets(labels, self.cfg.data.max_triplets, self._mine_gen)
            self.log("train/triplets_per_batch", float(len(q)), on_step=True)
            return weighted_ranking_loss(codes, q, i, j, w, margin), [codes], codes, labels
        a, p, n = mine_all_triplets(labels, self.cfg.data.max_triplets, self._mine_gen)
        self.log("train/triplets_per_batch", float(len(a)), on_step=True)
        return triplet_ranking_loss(codes[a], codes[p], codes[n], margin), [codes], codes, labels

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch[0], batch[1]
        explicit = self.cfg.data.sampling == "triplets"
        # Explicit triplets arrive as (b, 3, C, H, W); in-batch modes as (b, C, H, W).
        out = self.net(images.flatten(0, 1) if explicit else images)
        ranking, orth, codes, flat_labels = self._ranking(out, labels, 3 if explicit else 1)
        losses = combine_losses(ranking, orth, codes, out["logits"], flat_labels, self.cfg.loss)
        finite = bool(torch.isfinite(losses["loss"]))
        if self._trainer is not None and self.trainer.world_size > 1:
            # Stop every rank together (a rank that stopped alone would leave the others waiting).
            finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise FloatingPointError(
                f"non-finite loss at step {self.global_step}: "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                + "; lower optim.lr or check the input data. The last checkpoint is kept.")
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, on_step=True)
        self.log("loss", losses["loss"].detach(), prog_bar=True, on_step=True, logger=False)
        self.log("train/bit_balance", (codes.detach().float().mean(0) - 0.5).abs().mean(), on_step=True)
        return losses["loss"]

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
