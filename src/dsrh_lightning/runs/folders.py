"""Run folders: a run's name and folder, the checkpoint it continues from, its lock, its W&B id.

A fresh run never reuses a folder that holds a run (``resume=...`` continues it, ``overwrite=true``
replaces it), and a folder is written by one process at a time (:class:`RunFolderLock`).
"""

from __future__ import annotations

import os
import secrets
import string
import time
from pathlib import Path
from typing import Optional, Tuple

from omegaconf import DictConfig
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ..errors import RunFolderError
from ..files import check_writable, write_text

__all__ = ["RunFolderLock", "claim_run_folder", "holds_run", "resolve_run", "run_name", "write_wandb_id"]


def _name_prefix(cfg: DictConfig) -> str:
    return f"{cfg.data.dataset}-{cfg.experiment}-{cfg.model.bits}b-s{cfg.seed}"


def run_name(cfg: DictConfig) -> str:
    if cfg.name:
        return cfg.name
    # Ranks started by torchrun / srun compute the name independently: use the job id, not the clock.
    job = os.environ.get("SLURM_JOB_ID") or os.environ.get("TORCHELASTIC_RUN_ID")
    stamp = f"job{job}" if job and int(os.environ.get("WORLD_SIZE", "1")) > 1 else time.strftime("%Y%m%d-%H%M%S")
    return f"{_name_prefix(cfg)}-{stamp}"


def _fresh_folder(cfg: DictConfig, out: Path) -> Path:
    """``<out>/<name>``; a generated name that is taken (two runs started in the same second) gets
    ``-2``, ``-3``, ... A given ``name`` is used as it is (reusing it is checked when the folder is claimed)."""
    name = run_name(cfg)
    if cfg.name or name.startswith(f"{_name_prefix(cfg)}-job"):
        return out / name
    n, candidate = 1, out / name
    while candidate.exists():
        n += 1
        candidate = out / f"{name}-{n}"
    return candidate


def _stored_config(run_dir: Path) -> Optional[dict]:
    """The run's ``config.yaml`` as a dict, or None when it is missing or unreadable."""
    import yaml

    try:
        with open(run_dir / "config.yaml", encoding="utf-8") as f:
            stored = yaml.safe_load(f)
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return None
    return stored if isinstance(stored, dict) else None


def _newest_compatible(cfg: DictConfig, out: Path) -> Optional[Path]:
    """The newest ``last.ckpt`` of ``<out>/<dataset>-<experiment>-<bits>b-s<seed>-*`` whose run can continue
    with ``cfg`` (same backbone, method, ...: see ``checkpoints.incompatible_keys``); runs skipped for a
    differing key are named on stdout. A run without ``config.yaml`` is left to the checkpoint's own check."""
    from .checkpoints import incompatible_keys

    found = sorted(out.glob(f"{_name_prefix(cfg)}-*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    for last in reversed(found):
        stored = _stored_config(last.parent.parent)
        diff = incompatible_keys(cfg, stored) if stored is not None else []
        if not diff:
            return last
        print(f"resume=auto: skipping {last.parent.parent.name} (another configuration: {diff[0]})", flush=True)
    return None


def resolve_run(cfg: DictConfig) -> Tuple[Path, Optional[Path]]:
    """The run folder and the checkpoint to continue from (``resume=PATH|auto``), or None for a fresh run.

    ``auto`` takes ``<output_dir>/<name>/checkpoints/last.ckpt``; without ``name`` the newest
    ``last.ckpt`` of ``<output_dir>/<dataset>-<experiment>-<bits>b-s<seed>-*`` whose configuration can
    continue (another backbone, say, is skipped). No checkpoint: a fresh run.
    A path continues in that checkpoint's run folder unless ``name`` is given. Nothing is written here:
    :func:`claim_run_folder` locks the folder, :func:`open_resume` reads the checkpoint (once) and falls
    back where ``last.ckpt`` is unreadable.
    """
    out = Path(cfg.output_dir)
    if not cfg.resume:
        return _fresh_folder(cfg, out), None
    if cfg.resume == "auto":
        if cfg.name:
            last = out / cfg.name / "checkpoints" / "last.ckpt"
            found = last if last.is_file() else None
        else:
            found = _newest_compatible(cfg, out)
        if found is None:
            print(f"resume=auto: no last.ckpt for this run under {out}; starting a fresh run", flush=True)
            return _fresh_folder(cfg, out), None
        return found.parent.parent, found
    path = Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"resume={cfg.resume}: no such checkpoint file (use resume=auto to pick last.ckpt)")
    if not cfg.name and path.parent.name == "checkpoints":
        return path.parent.parent, path
    return out / run_name(cfg), path


# What marks a folder as holding a run (written by `dsrh train` before or during training).
_RUN_FILES = ("config.yaml", "metrics.json", "split.npz")


def holds_run(run_dir: Path) -> bool:
    """Whether ``run_dir`` holds (part of) a run: its config, metrics, split or any checkpoint."""
    return any((run_dir / f).exists() for f in _RUN_FILES) or any((run_dir / "checkpoints").glob("*.ckpt"))


class RunFolderLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` (which holds the owner's pid), held while a run
    writes the folder; the operating system drops it when the process ends, however it ends."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> "RunFolderLock":
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise RunFolderError(f"{self.run_dir}: in use by another dsrh process (pid {owner}; lock file "
                                 f"{self.path}). Wait for it to finish, or choose another name=") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None


LOCK_NAME = ".lock"


def claim_run_folder(cfg: DictConfig, run_dir: Path, resume: Optional[Path]) -> Tuple[RunFolderLock, bool]:
    """Create and lock ``run_dir`` before anything is written: ``(lock, created)``.

    Raises :class:`~dsrh_lightning.errors.RunFolderError` when the folder is locked by another process,
    when a fresh run (no ``resume``) would reuse a folder that holds a run (``overwrite=true`` deletes
    that run first), or when the folder cannot be created or written (e.g. a read-only ``output_dir``).
    """
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunFolderLock(run_dir).acquire()
    except RunFolderError:
        raise
    except OSError as exc:
        raise RunFolderError(f"{run_dir}: cannot create or write the run folder ({exc.strerror}); "
                             "set output_dir=PATH to a writable folder") from None
    try:
        restart = cfg.resume == "auto" and not (run_dir / "metrics.json").exists() and \
            not any((run_dir / "checkpoints").glob("*.ckpt"))  # killed before its first checkpoint
        # A checkpoint of another folder (resume=PATH name=NEW) starts a new run there: the same rule.
        elsewhere = resume is not None and Path(resume).resolve().parent.parent != run_dir.resolve()
        if (resume is None or elsewhere) and not created and holds_run(run_dir) and not restart:
            if not cfg.overwrite:
                raise RunFolderError(
                    f"{run_dir}: already holds a run ({_describe(run_dir)}). Continue it with name={run_dir.name} "
                    "resume=auto, start another with a new name=, or replace it with overwrite=true")
            _clear(run_dir)
            print(f"overwrite=true: deleted the earlier run in {run_dir}", flush=True)
        check_writable(run_dir / "config.yaml", "run configuration")
    except BaseException:
        lock.release()
        raise
    return lock, created


def _describe(run_dir: Path) -> str:
    have = [f for f in _RUN_FILES if (run_dir / f).exists()]
    have += [f"checkpoints/{p.name}" for p in sorted((run_dir / "checkpoints").glob("*.ckpt"))][:3]
    return ", ".join(have)


def _clear(run_dir: Path) -> None:
    """Delete everything in ``run_dir`` but its lock file."""
    import shutil

    for p in run_dir.iterdir():
        if p.name == LOCK_NAME:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def write_wandb_id(cfg: DictConfig, run_dir: Path) -> None:
    """Fix the W&B run id in ``run_dir/wandb_run_id`` (read by loggers.py), so a resumed run continues it."""
    path = run_dir / "wandb_run_id"
    if cfg.logger.name == "wandb" and rank_zero_only.rank == 0 and not path.is_file():
        alphabet = string.ascii_lowercase + string.digits
        write_text(path, "".join(secrets.choice(alphabet) for _ in range(8)) + "\n")
