"""W&B reports what checkpoint selection uses: the best validation MAP and the best checkpoint."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from pytorch_lightning.callbacks import Callback

__all__ = ["WandbBest"]


def _wandb_run(trainer):
    """The W&B run of the trainer's WandbLogger (rank 0), or None."""
    from pytorch_lightning.loggers import WandbLogger

    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.experiment
    return None


class WandbBest(Callback):
    """Make W&B report what checkpoint selection uses: the best validation MAP, and the best model.

    * ``define_metric("val/map", summary="max")``: the run summary's ``val/map`` is the best value, not the last;
    * ``best_val_map`` in the summary (the sweep files' metric), updated after every validation;
    * at the end of fitting, the best checkpoint as a ``model`` artifact (alias ``best``; offline runs keep
      it for ``wandb sync``), its metadata naming the checkpoint file (with its step) and ``val/map``.

    Does nothing when the trainer has no W&B logger.
    """

    def __init__(self, checkpoint) -> None:
        self.checkpoint = checkpoint  # the ModelCheckpoint that monitors val/map (mode max)
        self.best: Optional[float] = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        run = _wandb_run(trainer)
        if run is not None and stage == "fit":
            run.define_metric("val/map", summary="max")
            run.define_metric("best_val_map", summary="max")

    def _update(self, value: Optional[float]) -> None:
        if value is not None and math.isfinite(value) and (self.best is None or value > self.best):
            self.best = value

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        run = _wandb_run(trainer)
        if run is None:
            return
        score = self.checkpoint.best_model_score  # restored on resume; this validation is added below
        self._update(float(score) if score is not None else None)
        value = trainer.callback_metrics.get("val/map")
        self._update(float(value) if value is not None else None)
        if self.best is not None:
            run.summary["best_val_map"] = self.best

    def on_fit_end(self, trainer, pl_module) -> None:
        run = _wandb_run(trainer)
        if run is None:
            return
        score = self.checkpoint.best_model_score
        self._update(float(score) if score is not None else None)
        if self.best is not None:
            run.summary["best_val_map"] = self.best
        path = self.checkpoint.best_model_path
        if not path or not Path(path).is_file():
            return
        import wandb

        artifact = wandb.Artifact(f"model-{run.id}", type="model",
                                  metadata={"val/map": self.best, "checkpoint": Path(path).name,
                                            "trained_steps": trainer.global_step, "monitor": "val/map (max)"})
        artifact.add_file(path, name="best.ckpt")
        run.log_artifact(artifact, aliases=["best"])
