"""Evaluate a trained checkpoint on the test queries against the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from .callbacks import RetrievalEvaluation, RetrievalPlots
from .config import Config, ConfigError, normalise_overrides, parse_devices, validate
from .data.datamodule import HashingDataModule
from .module import HashingModule
from .resources import resolve_precision

__all__ = ["evaluate_checkpoint", "config_from_checkpoint"]


def config_from_checkpoint(path: Path, overrides: Sequence[str] = ()):
    """The run's config stored in the checkpoint, with ``key=value`` overrides (e.g. data.root)."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    hp = ckpt.get("hyper_parameters", {})
    if "config" not in hp:
        raise ConfigError(f"{path}: not a dsrh-lightning checkpoint (no hyper_parameters.config)")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), hp["config"])
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(normalise_overrides(overrides)))
    validate(cfg)
    return cfg, hp


def evaluate_checkpoint(path: Path, overrides: Sequence[str] = (), plots_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Test metrics of a checkpoint; with ``plots_dir``, also the retrieval plots as PNG files there."""
    cfg, hp = config_from_checkpoint(path, overrides)
    dm = HashingDataModule(cfg)
    dm.setup("test")
    module = HashingModule.load_from_checkpoint(str(path), map_location="cpu")
    evaluation = RetrievalEvaluation(cfg.eval)
    # trainer.devices / num_nodes / strategy apply: under DDP the callback gathers every rank's codes.
    t = cfg.trainer
    callbacks = [evaluation] + ([RetrievalPlots(cfg.eval, out_dir=plots_dir)] if plots_dir else [])
    trainer = pl.Trainer(accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes, strategy=t.strategy,
                         logger=False, callbacks=callbacks, enable_progress_bar=t.progress_bar,
                         precision=resolve_precision(t), use_distributed_sampler=False)
    trainer.test(module, datamodule=dm, verbose=False)
    return evaluation.last.get("test", {})
