"""Experiment loggers: Weights & Biases by default (offline when no API key is configured)."""

from __future__ import annotations

import math
import netrc
import os
from pathlib import Path
from typing import Optional, Union

from omegaconf import DictConfig
from pytorch_lightning.callbacks import Callback

__all__ = ["WandbBest", "build_logger", "wandb_key_available"]


def wandb_key_available() -> bool:
    """True when W&B has credentials: ``WANDB_API_KEY`` or an ``api.wandb.ai`` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(configured: str) -> str:
    """``logger.mode`` if set, else ``$WANDB_MODE``, else online with a key and offline without."""
    if configured:
        return configured
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if wandb_key_available() else "offline"


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str) -> Union[bool, object]:
    """The Lightning logger for ``cfg.logger.name`` (``False`` for ``none``)."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="", version="csv")
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(cfg.logger.mode)
    os.environ["WANDB_MODE"] = mode
    if mode == "offline":
        print(f"W&B: no API key configured (or WANDB_MODE=offline): logging offline under {run_dir}/wandb; "
              f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`.", flush=True)
    run_id = (run_dir / "wandb_run_id").read_text().strip() if (run_dir / "wandb_run_id").is_file() else None
    logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity or None, name=run_name,
                         save_dir=str(run_dir), tags=list(cfg.logger.tags) or None, id=run_id,
                         resume="allow" if run_id else None, offline=(mode == "offline"))
    return logger


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
