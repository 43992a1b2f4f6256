"""Training entry point: config -> data -> model -> Lightning fit -> test evaluation."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import LearningRateMonitor
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from .callbacks import RetrievalEvaluation, RetrievalPlots
from .callbacks.checkpoint import (AtomicCheckpointIO, FiniteModelCheckpoint, LastCheckpoint, TrainingInterrupted,
                                   assert_finite_parameters, newest_readable_checkpoint)
from .callbacks.progress import RunProgressBar, RunTimeEstimate, ValidateAtEnd
from .callbacks.wandb_best import WandbBest
from .config import Config, ConfigError, parse_devices, save_config, to_dict
from .data.datamodule import HashingDataModule
from .loggers import build_logger
from .models import build_backbone
from .module import HashingModule
from .resources import resolve_trainer
from .run import CheckpointError, read_checkpoint

__all__ = ["check_resume_compatible", "open_resume", "resolve_run", "run_name", "train"]

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
    A path continues in that checkpoint's run folder unless ``name`` is given. Nothing is read here:
    :func:`open_resume` reads the checkpoint (once) and falls back where ``last.ckpt`` is unreadable.
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


def open_resume(cfg: DictConfig, path: Path) -> Tuple[Path, Dict[str, Any]]:
    """Read the checkpoint to resume from: ``(path actually used, its contents)``.

    With ``resume=auto`` an unreadable ``last.ckpt`` falls back to the newest readable checkpoint
    beside it (said on stdout); with ``resume=PATH`` it is a ``ConfigError`` naming the file.
    """
    try:
        return path, read_checkpoint(path)
    except CheckpointError as exc:
        if cfg.resume != "auto":
            raise ConfigError(f"resume={cfg.resume}: {exc}") from None
        other = newest_readable_checkpoint(path.parent, exclude=path)
        if other is None:
            raise ConfigError(f"resume=auto: {exc}, and no other readable checkpoint in {path.parent}. "
                              "Give resume=PATH of a good checkpoint, or remove the folder to start over.") from None
        print(f"WARNING: resume=auto: {exc}; resuming from the newest readable checkpoint instead: {other}",
              flush=True)
        return other, read_checkpoint(other)


# Keys whose change makes a checkpoint unusable (weight shapes, the method, the meaning of the saved
# data-loader position). model.weights only picks the initialisation, which the checkpoint replaces.
_COMPAT_SECTIONS = ("model",)
_COMPAT_KEYS = ("loss.ranking", "data.dataset", "data.sampling", "data.cache_features", "data.feature_norm",
                "data.num_labels")
_COMPAT_IGNORE = ("model.weights",)


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _with_defaults(stored: Dict[str, Any]) -> Dict[str, Any]:
    """``stored`` (a saved config) over the schema's defaults: keys added since it was written get theirs."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    return merge(to_dict(OmegaConf.structured(Config)), stored)


def check_resume_compatible(cfg: DictConfig, ckpt_path: Path, ckpt: Dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming every key that differs between ``cfg`` and the config stored in
    ``ckpt`` (the contents of ``ckpt_path``, from :func:`open_resume`) and makes resuming impossible
    (see ``_COMPAT_*``); nothing is written."""
    stored = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"resume={cfg.resume}: {ckpt_path} stores no run configuration "
                          "(hyper_parameters.config); it was not written by dsrh train")
    # A key the checkpoint's version did not have yet (e.g. data.feature_norm) counts as today's default.
    old, new = _flat(_with_defaults(stored)), _flat(to_dict(cfg))
    keys = sorted(k for k in set(old) | set(new)
                  if (k.split(".")[0] in _COMPAT_SECTIONS or k in _COMPAT_KEYS) and k not in _COMPAT_IGNORE)
    diff = [f"{k}: checkpoint {old.get(k, '<unset>')!r}, now {new.get(k, '<unset>')!r}"
            for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]
    if diff:
        raise ConfigError(f"resume={cfg.resume}: {ckpt_path} cannot continue with this configuration; "
                          f"differing keys: {'; '.join(diff)}. Use the checkpoint's values, or start a new run "
                          "(another name=, without resume). Nothing was changed.")


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
        plugins=[AtomicCheckpointIO()],  # temp file beside the target + fsync + rename; weights_only loads
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
    _write_wandb_id(cfg, run_dir)
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
    callbacks = [evaluation, checkpoint, last_writer, RetrievalPlots(cfg.eval),  # plots go to W&B only
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
        raise FloatingPointError(f"{exc} -- training stopped; {kept}") from None
    except TrainingInterrupted as exc:  # SIGINT / SIGTERM: last.ckpt is written; exit without a traceback
        if trainer.is_global_zero:
            print(exc.message, flush=True)
        raise
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
