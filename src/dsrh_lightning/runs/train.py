"""Training entry point: config -> data -> model -> Lightning fit -> test evaluation."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ..config import parse_devices, save_config, to_dict
from ..data.datamodule import HashingDataModule
from ..errors import DivergedError, RunFolderError
from ..files import write_text
from ..lightning.callbacks import RetrievalEvaluation, RetrievalPlots
from ..lightning.callbacks.checkpoint import (AtomicCheckpointIO, FiniteModelCheckpoint, LastCheckpoint,
                                              TrainingInterrupted, assert_finite_parameters)
from ..lightning.callbacks.progress import RunProgressBar, RunTimeEstimate, ValidateAtEnd
from ..lightning.callbacks.wandb_best import WandbBest
from ..lightning.loggers import build_logger, quiet_lightning_tips
from ..lightning.module import HashingModule
from ..lightning.resources import resolve_trainer
from ..losses.from_config import check_loss_config
from ..models import build_backbone
from .checkpoints import check_resume_compatible, open_resume
from .folders import claim_run_folder, resolve_run, write_wandb_id

__all__ = ["build_trainer", "resolve_weights", "train"]

# Set by rank 0 for the processes Lightning's DDP launcher starts, so all ranks share one run folder.
_RUN_DIR_ENV, _RESUME_ENV = "DSRH_RUN_DIR", "DSRH_RESUME_CKPT"


def frozen_modules(module: pl.LightningModule) -> bool:
    """Whether the module has parameters that never train (a frozen backbone or frozen lower blocks)."""
    return any(not p.requires_grad for p in module.parameters())


def build_trainer(cfg: DictConfig, run_dir: Path, logger, callbacks) -> pl.Trainer:
    t = cfg.trainer
    by_steps = t.val_check_interval > 0
    quiet_lightning_tips()
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
    lock, created, header = None, False, ""
    if os.environ.get(_RUN_DIR_ENV):  # a process started by Lightning's DDP launcher
        run_dir, resume = Path(os.environ[_RUN_DIR_ENV]), (Path(os.environ[_RESUME_ENV]) if os.environ.get(_RESUME_ENV) else None)
    else:
        run_dir, resume = resolve_run(cfg)
        if resume is not None:  # before anything is written; Lightning reads it once more in fit()
            resume, ckpt = open_resume(cfg, resume)
            check_resume_compatible(cfg, resume, ckpt)
            header = _threads_history(cfg, run_dir, ckpt)
        if rank_zero_only.rank == 0:  # one process claims the folder (torchrun ranks share it)
            lock, created = claim_run_folder(cfg, run_dir, resume)
        os.environ[_RUN_DIR_ENV], os.environ[_RESUME_ENV] = str(run_dir), str(resume or "")
    try:
        return _train(cfg, run_dir, resume, created, header)
    finally:
        os.environ.pop(_RUN_DIR_ENV, None)
        os.environ.pop(_RESUME_ENV, None)
        if lock is not None:
            lock.release()


_THREADS_LINE = "# trainer.num_threads="


def _threads_history(cfg: DictConfig, run_dir: Path, ckpt: Dict[str, Any]) -> str:
    """``config.yaml``'s header when a resumed run uses another ``trainer.num_threads`` than its checkpoint:
    one comment line per earlier count and the steps it ran (the YAML below holds the count used now).
    Says so on stdout: float sums then round differently, so results differ slightly from a run that
    kept one count."""
    stored = (((ckpt.get("hyper_parameters") or {}).get("config") or {}).get("trainer") or {}).get("num_threads")
    step = int(ckpt.get("global_step", 0))
    try:
        old = (run_dir / "config.yaml").read_text(encoding="utf-8").splitlines()
    except OSError:
        old = []
    lines = [ln for ln in old if ln.startswith(_THREADS_LINE)]
    now = int(cfg.trainer.num_threads)
    if stored is not None and int(stored) != now:
        start = lines[-1].rsplit("-", 1)[-1] if lines else "0"
        lines.append(f"{_THREADS_LINE}{int(stored)} ran steps {start}-{step}")
        print(f"NOTE: resuming step {step} with trainer.num_threads={now}; the checkpoint's steps ran with "
              f"{int(stored)}. Results differ slightly (float rounding) from a run with one count; "
              "config.yaml records both", flush=True)
    if not lines:
        return ""
    return ("# This run was resumed with another trainer.num_threads; the value below is used from the last "
            "step listed on.\n" + "\n".join(lines) + "\n")


def _train(cfg: DictConfig, run_dir: Path, resume: Optional[Path], created: bool, header: str) -> Dict[str, Any]:
    name = run_dir.name
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
    save_config(cfg, run_dir / "config.yaml", header=header)
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
                                 every_minutes=cfg.trainer.checkpoint_every_minutes, guard=run_dir / "config.yaml")
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
        with warnings.catch_warnings():
            if frozen_modules(module):  # frozen blocks stay in eval mode on purpose (models/blocks.py)
                warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
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
        trainer.save_checkpoint(str(last), weights_only=False)
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
        if not (run_dir / "config.yaml").is_file():
            raise RunFolderError(f"{run_dir / 'config.yaml'} is gone: the run folder was deleted or emptied while "
                                 f"training; metrics.json was not written. Results: {json.dumps(results)}")
        write_text(run_dir / "metrics.json", json.dumps(results, indent=2))
    return results
