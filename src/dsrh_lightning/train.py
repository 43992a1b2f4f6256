"""Training entry point: config -> data -> model -> Lightning fit -> test evaluation."""

from __future__ import annotations

import json
import os
import secrets
import string
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from .callbacks import RetrievalEvaluation, RetrievalPlots
from .callbacks.checkpoint import FiniteModelCheckpoint, assert_finite_parameters
from .callbacks.progress import RunProgressBar, RunTimeEstimate, ValidateAtEnd
from .callbacks.wandb_best import WandbBest
from .config import parse_devices, save_config, to_dict
from .data.datamodule import HashingDataModule
from .loggers import build_logger
from .module import HashingModule
from .resources import resolve_trainer

__all__ = ["resolve_run", "run_name", "train"]

# Set by rank 0 for the processes Lightning's DDP launcher starts, so all ranks share one run folder.
_RUN_DIR_ENV, _RESUME_ENV = "DSRH_RUN_DIR", "DSRH_RESUME_CKPT"


def _name_prefix(cfg: DictConfig) -> str:
    return f"{cfg.data.dataset}-{cfg.experiment}-{cfg.model.bits}b-s{cfg.seed}"


def run_name(cfg: DictConfig) -> str:
    if cfg.name:
        return cfg.name
    # Ranks started by torchrun / srun compute the name independently: use the job id, not the clock.
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    stamp = f"job{job}" if job and int(os.environ.get("WORLD_SIZE", "1")) > 1 else time.strftime("%Y%m%d-%H%M%S")
    return f"{_name_prefix(cfg)}-{stamp}"


def resolve_run(cfg: DictConfig) -> Tuple[Path, Optional[Path]]:
    """The run folder and the checkpoint to continue from (``resume=PATH|auto``), or None for a fresh run.

    ``auto`` takes ``<output_dir>/<name>/checkpoints/last.ckpt``; without ``name`` the newest
    ``last.ckpt`` of ``<output_dir>/<dataset>-<experiment>-<bits>b-s<seed>-*``. No checkpoint: a fresh run.
    A path continues in that checkpoint's run folder unless ``name`` is given.
    """
    out = Path(cfg.output_dir)
    if not cfg.resume:
        return out / run_name(cfg), None
    if cfg.resume == "auto":
        if cfg.name:
            last = out / cfg.name / "checkpoints" / "last.ckpt"
            found = [last] if last.is_file() else []
        else:
            found = sorted(out.glob(f"{_name_prefix(cfg)}-*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
        if not found:
            print(f"resume=auto: no last.ckpt for this run under {out}; starting a fresh run", flush=True)
            return out / run_name(cfg), None
        return found[-1].parent.parent, found[-1]
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto to pick last.ckpt)")
    if not cfg.name and path.parent.name == "checkpoints":
        return path.parent.parent, path
    return out / run_name(cfg), path


def _write_wandb_id(cfg: DictConfig, run_dir: Path) -> None:
    """Fix the W&B run id in ``run_dir/wandb_run_id`` (read by loggers.py), so a resumed run continues it."""
    path = run_dir / "wandb_run_id"
    if cfg.logger.name == "wandb" and rank_zero_only.rank == 0 and not path.is_file():
        alphabet = string.ascii_lowercase + string.digits
        path.write_text("".join(secrets.choice(alphabet) for _ in range(8)) + "\n")


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
        # The data module shards data itself: resumable training batches, padded evaluation shares.
        use_distributed_sampler=False,
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
    ``checkpoints/`` (``last.ckpt`` every ``trainer.checkpoint_every_n_steps`` steps, at
    validations and at the end; the best by validation MAP), ``metrics.json``,
    ``wandb_run_id``. ``resume=PATH|auto`` continues a run (see :func:`resolve_run`).
    Returns the metrics dict.
    """
    pl.seed_everything(cfg.seed, workers=True)
    resolve_trainer(cfg)  # precision=auto, num_threads=0 -> the values used (recorded in config.yaml)
    resolve_weights(cfg)
    if os.environ.get(_RUN_DIR_ENV):  # a process started by Lightning's DDP launcher
        run_dir, resume = Path(os.environ[_RUN_DIR_ENV]), (Path(os.environ[_RESUME_ENV]) if os.environ.get(_RESUME_ENV) else None)
    else:
        run_dir, resume = resolve_run(cfg)
        os.environ[_RUN_DIR_ENV], os.environ[_RESUME_ENV] = str(run_dir), str(resume or "")
    try:
        return _train(cfg, run_dir, resume)
    finally:
        os.environ.pop(_RUN_DIR_ENV, None)
        os.environ.pop(_RESUME_ENV, None)


def _train(cfg: DictConfig, run_dir: Path, resume: Optional[Path]) -> Dict[str, Any]:
    name = run_dir.name
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    if resume is not None:
        print(f"resuming {run_dir} from {resume}", flush=True)
    dm = HashingDataModule(cfg, split_copy=run_dir / "split.npz")
    dm.prepare_data()
    dm.setup("fit")  # fail fast on data problems, before the model is built
    print(f"data: {cfg.data.dataset} {dm.split.summary()}; image size {dm.image_size}", flush=True)
    module = HashingModule(to_dict(cfg), num_classes=dm.num_classes, multilabel=dm.multilabel,
                           feature_dim=dm.feature_dim)
    _write_wandb_id(cfg, run_dir)
    logger = build_logger(cfg, run_dir, name)
    evaluation = RetrievalEvaluation(cfg.eval)
    ckpt_dir = run_dir / "checkpoints"
    checkpoint = FiniteModelCheckpoint(
        dirpath=str(ckpt_dir), monitor="val/map", mode="max", save_last=True, save_top_k=1,
        filename="best-step{step}-map{val/map:.4f}", auto_insert_metric_name=False,
    )
    callbacks = [evaluation, checkpoint, RetrievalPlots(cfg.eval), ValidateAtEnd(), RunTimeEstimate()]  # plots: W&B only
    if cfg.trainer.checkpoint_every_n_steps > 0:
        callbacks.append(FiniteModelCheckpoint(dirpath=str(ckpt_dir), every_n_train_steps=cfg.trainer.checkpoint_every_n_steps,
                                               save_top_k=0, save_last=True))
    if cfg.trainer.progress_bar:
        callbacks.append(RunProgressBar(refresh_rate=10))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
        callbacks.append(WandbBest(checkpoint))  # no-op for other loggers
    trainer = build_trainer(cfg, run_dir, logger, callbacks)
    last = ckpt_dir / "last.ckpt"
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume) if resume else None)
    except FloatingPointError as exc:
        kept = f"last good checkpoint: {last} (continue with resume=auto or resume={last})" if last.is_file() \
            else "no checkpoint had been written yet"
        raise FloatingPointError(f"{exc} -- training stopped; {kept}") from None
    # The final state, whatever the step (periodic and validation checkpoints may be older).
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
