"""Training entry point: config -> data -> model -> Lightning fit -> test evaluation."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint, TQDMProgressBar

from .callbacks import RetrievalEvaluation, RetrievalPlots
from .config import save_config, to_dict
from .data.datamodule import HashingDataModule
from .loggers import build_logger
from .module import HashingModule

__all__ = ["run_name", "train"]


def run_name(cfg: DictConfig) -> str:
    if cfg.name:
        return cfg.name
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{cfg.data.dataset}-{cfg.experiment}-{cfg.model.bits}b-s{cfg.seed}-{stamp}"


def _devices(value: str):
    return int(value) if str(value).isdigit() else value


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks) -> pl.Trainer:
    t = cfg.trainer
    by_steps = t.val_check_interval > 0
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps, max_epochs=t.max_epochs,
        val_check_interval=t.val_check_interval if by_steps else 1.0,
        check_val_every_n_epoch=None if by_steps else 1,
        accelerator=t.accelerator, devices=_devices(t.devices), num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps, limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic, logger=logger, callbacks=callbacks,
        enable_progress_bar=t.progress_bar, num_sanity_val_steps=1,
    )


def resolve_weights(cfg: DictConfig) -> None:
    """Turn ``model.weights=auto`` into ``imagenet`` (if the weights load) or ``none`` (with a warning)."""
    if cfg.model.weights != "auto":
        return
    from .models.backbones import WeightsUnavailableError, build_backbone

    try:
        build_backbone(cfg.model.backbone, "imagenet", cfg.model.hash_input)
        cfg.model.weights = "imagenet"
    except WeightsUnavailableError as exc:
        cfg.model.weights = "none"
        print(f"WARNING: model.weights=auto: ImageNet weights unavailable, TRAINING FROM SCRATCH "
              f"(model.weights=none; the saved config records this). Reason: {exc}", flush=True)


def train(cfg: DictConfig) -> Dict[str, Any]:
    """Train, select the checkpoint with the best validation MAP, evaluate it on the test queries.

    Writes ``<output_dir>/<name>/``: ``config.yaml`` (resolved), ``split.npz``,
    ``checkpoints/`` (last + best), ``metrics.json``. Returns the metrics dict.
    """
    pl.seed_everything(cfg.seed, workers=True)
    resolve_weights(cfg)
    name = run_name(cfg)
    run_dir = Path(cfg.output_dir) / name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    dm = HashingDataModule(cfg, split_copy=run_dir / "split.npz")
    dm.prepare_data()
    dm.setup("fit")  # fail fast on data problems, before the model is built
    print(f"data: {cfg.data.dataset} {dm.split.summary()}; image size {dm.image_size}", flush=True)
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes, multilabel=dm.multilabel)
    logger = build_logger(cfg, run_dir, name)
    evaluation = RetrievalEvaluation(cfg.eval)
    checkpoint = ModelCheckpoint(
        dirpath=str(run_dir / "checkpoints"), monitor="val/map", mode="max", save_last=True, save_top_k=1,
        filename="best-step{step}-map{val/map:.4f}", auto_insert_metric_name=False,
    )
    callbacks = [evaluation, checkpoint, RetrievalPlots(cfg.eval)]  # plots go to W&B only
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=10))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    trainer.fit(module, datamodule=dm)
    results: Dict[str, Any] = {"run_dir": str(run_dir), "best_checkpoint": checkpoint.best_model_path or None,
                               "last_checkpoint": checkpoint.last_model_path or None}
    results.update(evaluation.last.get("val", {}))
    if checkpoint.best_model_score is not None:
        results["best_val_map"] = float(checkpoint.best_model_score)
    if cfg.trainer.test_after_fit:
        ckpt = checkpoint.best_model_path or None
        trainer.test(module, datamodule=dm, ckpt_path=ckpt, verbose=False)
        results.update(evaluation.last.get("test", {}))
    (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results
