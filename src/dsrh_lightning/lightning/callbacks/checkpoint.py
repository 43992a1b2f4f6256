"""Checkpoints you can trust.

* :func:`assert_finite_parameters` / :class:`FiniteModelCheckpoint`: never write a model with NaN/inf.
* :class:`AtomicCheckpointIO`: the file is written to a temporary file NEXT TO the target (same folder,
  same filesystem), flushed and fsync'ed, then ``os.replace``'d over the target, so a kill during a save
  leaves the previous checkpoint intact (Lightning's own atomic save may go through ``$TMPDIR`` and fall
  back to truncate-and-copy across filesystems). Orphaned temporary files of killed saves are removed
  by the next successful save.
* :class:`LastCheckpoint`: the ONE owner of ``last.ckpt`` (always the newest state): every
  ``every_n_steps`` steps, every ``every_minutes`` minutes, after each validation, at the end of fit,
  and on SIGINT / SIGTERM (then training stops with :class:`TrainingInterrupted`).
"""

from __future__ import annotations

import copy
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ...errors import RunFolderError
from ...files import TMP_MARK, atomic_write, tmp_owner_alive


__all__ = ["AtomicCheckpointIO", "FiniteModelCheckpoint", "LastCheckpoint", "TrainingInterrupted",
           "assert_finite_parameters", "atomic_torch_save", "is_final_batch"]



def assert_finite_parameters(module: torch.nn.Module) -> None:
    """Raise ``FloatingPointError`` naming the first parameter with a NaN or inf value."""
    for name, p in module.named_parameters():
        if not torch.isfinite(p.detach()).all():
            raise FloatingPointError(
                f"parameter '{name}' has non-finite values; not writing a checkpoint "
                "(the previous checkpoint is kept). Lower optim.lr or set trainer.gradient_clip_val.")


def _remove_orphans(folder: Path, keep: Path) -> None:
    """Temporary files left in ``folder`` by killed saves (any target), except ``keep`` and those of
    processes still running (another run's save in progress is never touched)."""
    for p in folder.glob(f".*{TMP_MARK}*"):
        if p != keep and not tmp_owner_alive(p):
            try:
                p.unlink()
            except OSError:
                pass


def atomic_torch_save(obj: Any, path) -> None:
    """``torch.save`` that never leaves a partial file at ``path``: temp file beside it, fsync, rename
    (:func:`~dsrh_lightning.files.atomic_write`). A full disk or a size limit raises
    :class:`~dsrh_lightning.files.WriteError` naming the file, and the previous checkpoint stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        torch.save(obj, f)
    _remove_orphans(path.parent, keep=path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that saves with :func:`atomic_torch_save` and loads with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path, map_location=lambda storage, loc: storage, weights_only=None):
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class FiniteModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that refuses (and stops the run) when the weights contain NaN/inf,
    so the checkpoints always hold a good state."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        assert_finite_parameters(trainer.lightning_module)
        super()._save_checkpoint(trainer, filepath)


def is_final_batch(trainer: pl.Trainer, batch_idx: int) -> bool:
    """True in ``on_train_batch_end`` of the run's last batch (``max_steps`` reached, or the last batch
    of the last epoch under ``max_epochs``)."""
    if trainer.max_steps and 0 < trainer.max_steps <= trainer.global_step:
        return True
    return bool(trainer.max_epochs and trainer.max_epochs > 0 and trainer.current_epoch + 1 >= trainer.max_epochs
                and batch_idx + 1 >= trainer.num_training_batches)


class TrainingInterrupted(SystemExit):
    """Training stopped on SIGINT / SIGTERM after ``last.ckpt`` was written.

    A ``SystemExit`` with the shell's code for the signal (130 / 143): the process ends without a
    traceback; ``message`` names the checkpoint and how to continue."""

    def __init__(self, signum: int, path: Path, step: Optional[int], again: bool = False) -> None:
        super().__init__(128 + int(signum))
        self.signum, self.path, self.step = int(signum), path, step
        name = signal.Signals(signum).name
        run = Path(path).parent.parent
        hint = f"Continue with name={run.name} resume=auto (output_dir={run.parent}) or resume={path}"
        if not again:
            self.message = f"{name} received: training stopped at step {step}; the state is saved in {path}. {hint}"
        elif step is not None:
            self.message = (f"{name} received again: training stopped at once, without saving the current step; "
                            f"{path} holds step {step}. {hint}")
        elif Path(path).is_file():
            self.message = (f"{name} received again: training stopped at once, without saving; {path} holds the "
                            f"state this run started from. {hint}")
        else:
            self.message = f"{name} received again: training stopped at once; no checkpoint was written yet."


class LastCheckpoint(Callback):
    """Sole writer of ``<dirpath>/last.ckpt``, which always holds the newest state.

    Saves after every ``every_n_steps``-th optimiser step (0 = off), when ``every_minutes`` have passed
    since the last save (0 = off), after each validation and at the end of fit. While training, SIGINT
    and SIGTERM are caught: the current step finishes, ``last.ckpt`` is written, and
    :class:`TrainingInterrupted` ends the fit (a second signal stops at once and names the checkpoint that remains).
    """

    def __init__(self, dirpath, every_n_steps: int = 0, every_minutes: float = 0.0,
                 guard: Optional[Path] = None) -> None:
        self.path = Path(dirpath) / "last.ckpt"
        self.guard = Path(guard) if guard is not None else None  # a file of the run that must still exist
        self.every_n_steps, self.every_minutes = int(every_n_steps), float(every_minutes)
        self._last_time = time.monotonic()
        self._signal: Optional[int] = None
        self._previous: Dict[int, Any] = {}
        #: The global step last written to ``last.ckpt`` by this callback (None: not yet in this fit).
        self.saved_step: Optional[int] = None
        self._final_loops: Optional[Dict[str, Any]] = None  # loop state at the end of the last step
        self._final_step: Optional[int] = None

    # -- signals -----------------------------------------------------------------------------------
    def _handler(self, signum, frame) -> None:
        if self._signal is not None:  # second signal: stop now, naming what is on disk
            self._restore_handlers()
            raise TrainingInterrupted(signum, self.path, self.saved_step, again=True)
        self._signal = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and writing {self.path} ...",
              flush=True)

    def _install_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._handler)

    def _restore_handlers(self) -> None:
        for sig, old in self._previous.items():
            try:
                signal.signal(sig, old if old is not None else signal.SIG_DFL)
            except (ValueError, TypeError):
                pass
        self._previous = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_time = time.monotonic()
        self._signal = None
        self._final_loops, self._final_step = None, None
        self._install_handlers()

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore_handlers()

    def teardown(self, trainer, pl_module, stage) -> None:
        self._restore_handlers()

    # -- saving ------------------------------------------------------------------------------------
    def save(self, trainer: pl.Trainer) -> None:
        if self.guard is not None and not self.guard.is_file():
            raise RunFolderError(f"{self.guard} is gone: the run folder was deleted or emptied while training; "
                                 f"stopped at step {trainer.global_step} without writing into it")
        assert_finite_parameters(trainer.lightning_module)
        trainer.save_checkpoint(str(self.path), weights_only=False)  # the full state (said, not defaulted)
        self._last_time = time.monotonic()
        self.saved_step = trainer.global_step

    @staticmethod
    def _any_rank(trainer: pl.Trainer, due: bool, stop: bool) -> "tuple[bool, bool]":
        """``(due, stop)``, each true when it is true on any rank: one collective per step under DDP."""
        if trainer.world_size == 1:
            return due, stop
        flags = torch.tensor([float(due), float(stop)], device=trainer.strategy.root_device)
        flags = trainer.strategy.reduce(flags, reduce_op="sum")
        return bool(flags[0] > 0), bool(flags[1] > 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        due = self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0
        due = due or (self.every_minutes > 0 and time.monotonic() - self._last_time >= 60 * self.every_minutes)
        # The last step is saved here, inside the loop, like any other step: a checkpoint written after
        # fit() returns records the loops as finished, and continuing it (max_steps 20 -> 40) skipped an
        # epoch's batches.
        final = is_final_batch(trainer, batch_idx)
        due, stop = self._any_rank(trainer, due or final, self._signal is not None)
        if final:
            self._final_step = step  # on_save_checkpoint keeps the loop state of this save
        if due or stop:
            self.save(trainer)
        if stop:
            self._restore_handlers()
            raise TrainingInterrupted(self._signal or signal.SIGTERM, self.path, step)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        """Checkpoints of the last step all carry the loop state of its ``on_train_batch_end``.

        The final validation runs only because the run ends there (not on Lightning's schedule); a
        checkpoint written after it records a loop state that Lightning, on restart with a larger
        ``max_steps``, reads as "this epoch still has batches", so the continued run repeated a batch.
        The weights and the best-model record are those after the validation; only ``loops`` is replaced.
        """
        if self._final_step is None or trainer.global_step != self._final_step or "loops" not in checkpoint:
            return
        if self._final_loops is None:
            self._final_loops = copy.deepcopy(checkpoint["loops"])
        else:
            checkpoint["loops"] = copy.deepcopy(self._final_loops)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self.save(trainer)  # after the best-model callback, so last.ckpt records the best so far
