"""Checkpointing that never writes a broken model: parameters are checked for NaN/inf before saving."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

__all__ = ["FiniteModelCheckpoint", "assert_finite_parameters"]


def assert_finite_parameters(module: torch.nn.Module) -> None:
    """Raise ``FloatingPointError`` naming the first parameter with a NaN or inf value."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise FloatingPointError(
                f"parameter '{name}' has non-finite values; not writing a checkpoint "
                "(the previous checkpoint is kept). Lower optim.lr or set trainer.gradient_clip_val.")


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refuses (and stops the run) when the weights contain NaN/inf,
    so ``last.ckpt`` always holds the last good state."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        assert_finite_parameters(trainer.lightning_module)
        super()._save_checkpoint(trainer, filepath)
