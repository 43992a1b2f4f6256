"""Evaluate a trained checkpoint on the test queries against the database."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import pytorch_lightning as pl

from ..lightning.callbacks import RetrievalEvaluation, RetrievalPlots
from ..config import parse_devices
from ..data.datamodule import HashingDataModule
from ..models import build_backbone
from ..lightning.resources import resolve_precision
from .checkpoints import load_run

__all__ = ["evaluate_checkpoint", "config_from_checkpoint", "checkpoint_step"]


def config_from_checkpoint(path: Path, overrides: Sequence[str] = ()):
    """``(config, hyperparameters)`` of a checkpoint (read safely), with ``key=value`` overrides (e.g. data.root)."""
    run = load_run(path, overrides, build_module=False)
    return run.cfg, run.hparams


def checkpoint_step(path: Path) -> int:
    """The training step a checkpoint was saved at (memory-mapped: the weights are not read)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # a file system without mmap: read it whole
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt.get("global_step", 0))


def evaluate_checkpoint(path: Path, overrides: Sequence[str] = (), plots_dir: Optional[Path] = None,
                        plots_format: str = "png") -> Dict[str, Any]:
    """Test metrics of a checkpoint; with ``plots_dir``, also the retrieval plots there (``plots_format``)."""
    run = load_run(path, overrides)
    cfg = run.cfg
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("test")
    step = checkpoint_step(path)
    evaluation = RetrievalEvaluation(cfg.eval, step=step)
    # trainer.devices / num_nodes / strategy apply: under DDP the callback gathers every rank's codes.
    t = cfg.trainer
    callbacks = [evaluation] + ([RetrievalPlots(cfg.eval, out_dir=plots_dir, fmt=plots_format, run_cfg=cfg,
                                                step=step)]
                                if plots_dir else [])
    from ..lightning.loggers import quiet_lightning_tips

    quiet_lightning_tips()
    trainer = pl.Trainer(accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes, strategy=t.strategy,
                         logger=False, callbacks=callbacks, enable_progress_bar=t.progress_bar,
                         precision=resolve_precision(t), use_distributed_sampler=False)
    trainer.test(run.module, datamodule=dm, verbose=False)
    return evaluation.last.get("test", {})
