"""Training entry point: config -> data -> model -> Lightning fit -> test evaluation."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor

from ..config import parse_devices, save_config, to_dict
from ..data.datamodule import HashingDataModule
from ..errors import DivergedError
from ..lightning.callbacks import RetrievalEvaluation, RetrievalPlots
from ..lightning.callbacks.checkpoint import (AtomicCheckpointIO, FiniteModelCheckpoint, LastCheckpoint,
                                              TrainingInterrupted, assert_finite_parameters)
from ..lightning.callbacks.progress import RunProgressBar, RunTimeEstimate, ValidateAtEnd
from ..lightning.callbacks.wandb_best import WandbBest
from ..lightning.loggers import build_logger
from ..lightning.module import HashingModule
from ..lightning.resources import resolve_trainer
from ..losses.from_config import check_loss_config
from ..models import build_backbone
from .checkpoints import check_resume_compatible, open_resume
from .folders import resolve_run, write_wandb_id

__all__ = ["build_trainer", "resolve_weights", "train"]

# Set by rank 0 for the processes Lightning's DDP launcher starts, so all ranks share one run folder.
_RUN_DIR_ENV, _RESUME_ENV = "DSRH_RUN_DIR", "DSRH_RESUME_CKPT"


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks) -> pl.Trainer:
    t = cfg.trainer
    by_steps = t.val_check_interval > 0
    return pl.Trainer(
        default_root_dir=str(run_dir),
        max_steps=t.max_steps, max_epochs=t.max_epochs,
        val_check_interval=t.val_check_interval if by_steps else 1.0,
        check_val_every_n_epoch=None if by_steps else 1,
        accelerator=t.accelerator, devices=parse_devices(t.devices), num_nodes=t.num_nodes, strategy=t.strategy,
        precision=t.precision, gradient_clip_val=t.gradient_clip_val or None,
        log_every_n_steps=t.log_every_n_steps, limit_val_batches=t.limit_val_batches,
        deterministic=t.deterministic, logger=logger, callbacks=callbacks,
        enable_progress_bar=t.progress_bar, num_sanity_val_steps=1,
        plugins=[AtomicCheckpointIO()],  # temp file beside the target + fsync + rename; weights_only loads
        # The data module shards data itself: resumable training batches, padded evaluation shares.
        use_distributed_sampler=False,
    )


def resolve_weights(cfg: DictConfig) -> None:
    """Turn ``model.weights=auto`` into ``imagenet`` (if the weights load) or ``none`` (with a warning)."""
    if cfg.model.weights != "auto":
        return
    from ..models.backbones import WeightsUnavailableError, build_backbone

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
    ``checkpoints/`` (``last.ckpt`` every ``trainer.checkpoint_every_n_steps`` steps, at
    validations and at the end; the best by validation MAP), ``metrics.json``,
    ``wandb_run_id``. ``resume=PATH|auto`` continues a run (see :func:`resolve_run`).
    Returns the metrics dict.
    """
    check_loss_config(cfg)  # loss.params and the sampling, before a folder is claimed or data read
    pl.seed_everything(cfg.seed, workers=True)
    resolve_trainer(cfg)  # precision=auto, num_threads=0 -> the values used (recorded in config.yaml)
    resolve_weights(cfg)
    if os.environ.get(_RUN_DIR_ENV):  # a process started by Lightning's DDP launcher
        run_dir, resume = Path(os.environ[_RUN_DIR_ENV]), (Path(os.environ[_RESUME_ENV]) if os.environ.get(_RESUME_ENV) else None)
    else:
        run_dir, resume = resolve_run(cfg)
        if resume is not None:  # before anything is written; Lightning reads it once more in fit()
            resume, ckpt = open_resume(cfg, resume)
            check_resume_compatible(cfg, resume, ckpt)
        os.environ[_RUN_DIR_ENV], os.environ[_RESUME_ENV] = str(run_dir), str(resume or "")
    try:
        return _train(cfg, run_dir, resume)
    finally:
        os.environ.pop(_RUN_DIR_ENV, None)
        os.environ.pop(_RESUME_ENV, None)


def _train(cfg: DictConfig, run_dir: Path, resume: Optional[Path]) -> Dict[str, Any]:
    name = run_dir.name
    created = not run_dir.exists()
    if resume is not None:
        print(f"resuming {run_dir} from {resume}", flush=True)
    dm = HashingDataModule(cfg, split_copy=run_dir / "split.npz", backbone_factory=build_backbone)
    try:
        dm.prepare_data()
        dm.setup("fit")  # fail fast on data problems, before the model is built
    except BaseException:
        if created and run_dir.is_dir():  # a failed start leaves no runs/<name>/ behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    save_config(cfg, run_dir / "config.yaml")
    print(f"data: {cfg.data.dataset} {dm.split.summary()}; image size {dm.image_size}", flush=True)
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes, multilabel=dm.multilabel,
                           feature_dim=dm.feature_dim, feature_stats=dm.feature_stats)
    write_wandb_id(cfg, run_dir)
    logger = build_logger(cfg, run_dir, name)
    evaluation = RetrievalEvaluation(cfg.eval)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = FiniteModelCheckpoint(
        dirpath=str(ckpt_dir), monitor="val/map", mode="max", save_last=False, save_top_k=1,
        filename="best-step{step}-map{val/map:.4f}", auto_insert_metric_name=False,
    )
    # LastCheckpoint is the only writer of last.ckpt (N steps, M minutes, validations, SIGINT/SIGTERM);
    # it comes after `checkpoint` so last.ckpt records the best model so far.
    last_writer = LastCheckpoint(ckpt_dir, every_n_steps=cfg.trainer.checkpoint_every_n_steps,
                                 every_minutes=cfg.trainer.checkpoint_every_minutes)
    callbacks = [evaluation, checkpoint, last_writer, RetrievalPlots(cfg.eval, out_dir=run_dir / "plots", run_cfg=cfg),
                 ValidateAtEnd(), RunTimeEstimate()]
    if cfg.trainer.progress_bar:
        callbacks.append(RunProgressBar(refresh_rate=10))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(WandbBest(checkpoint))  # no-op for other loggers
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    last = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None, weights_only=True)
    except FloatingPointError as exc:
        kept = f"last good checkpoint: {last} (continue with resume=auto or resume={last})" if last.is_file() \
            else "no checkpoint had been written yet"
        raise DivergedError(f"{exc} -- training stopped; {kept}") from None
    except TrainingInterrupted as exc:  # SIGINT / SIGTERM: last.ckpt is written; exit without a traceback
        if trainer.is_global_zero:
            print(exc.message, flush=True)
        raise
    # last.ckpt holds the final step, written inside the loop (see LastCheckpoint), so continuing this run
    # with a larger max_steps is exact. Written here only when the loop ended otherwise.
    if last_writer.saved_step != trainer.global_step and not (resume is not None and resume == last):
        assert_finite_parameters(module)
        trainer.save_checkpoint(str(last))
    results: Dict[str, Any] = {"run_dir": str(run_dir), "best_checkpoint": checkpoint.best_model_path or None,
                               "last_checkpoint": str(last), "global_step": trainer.global_step}
    results.update(evaluation.last.get("val", {}))
    if checkpoint.best_model_score is not None:
        results["best_val_map"] = float(checkpoint.best_model_score)
    if cfg.trainer.test_after_fit:
        ckpt = checkpoint.best_model_path or None
        trainer.test(module, datamodule=dm, ckpt_path=ckpt, verbose=False)
        results.update(evaluation.last.get("test", {}))
    if trainer.is_global_zero:
        (run_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    return results
