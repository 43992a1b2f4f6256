"""What the first hour needs to see: whole-run progress, an early run-time estimate, a final validation.

* :class:`RunProgressBar`: the main bar counts optimiser steps to ``trainer.max_steps`` (not the
  batches of one epoch), so its rate and ETA are those of the whole run.
* :class:`RunTimeEstimate`: after the first steps, prints the estimated run time; on a machine without
  a GPU, a warning that names the fast alternatives when the run would be long.
* :class:`ValidateAtEnd`: the last step is always validated (so every run has ``val/map`` and a best
  checkpoint, e.g. ``trainer.max_steps=50`` with ``val_check_interval=100``).
"""

from __future__ import annotations

import time
from typing import Optional

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, TQDMProgressBar
from pytorch_lightning.utilities.rank_zero import rank_zero_info, rank_zero_warn

from .checkpoint import is_final_batch

__all__ = ["RunProgressBar", "RunTimeEstimate", "ValidateAtEnd", "format_duration"]


def format_duration(seconds: float) -> str:
    """``42 s``, ``12 min``, ``3 h 05 min``, ``2 d 04 h``."""
    s = max(0, int(round(seconds)))
    if s < 90:
        return f"{s} s"
    if s < 3600:
        return f"{round(s / 60)} min"
    h, m = divmod(round(s / 60), 60)
    if h < 48:
        return f"{h} h {m:02d} min"
    d, h = divmod(h, 24)
    return f"{d} d {h:02d} h"


def _total_steps(trainer: "pl.Trainer") -> Optional[int]:
    """The run's optimiser steps: ``max_steps``, else ``max_epochs`` x batches per epoch, else None."""
    if trainer.max_steps and trainer.max_steps > 0:
        return int(trainer.max_steps)
    per_epoch = trainer.num_training_batches
    if trainer.max_epochs and trainer.max_epochs > 0 and per_epoch not in (None, float("inf")):
        return int(trainer.max_epochs * per_epoch)
    return None


class RunProgressBar(TQDMProgressBar):
    """TQDM bar over the whole run: ``step 1200/10000 [rate, ETA of the run]``, epoch in the description."""

    def on_train_epoch_start(self, trainer: "pl.Trainer", *_) -> None:
        bar = self.train_progress_bar
        if trainer.current_epoch == 0 or bar.total != _total_steps(trainer):
            # Reset once (the timer then spans every epoch); ``initial`` keeps a resumed run's rate honest.
            bar.reset(total=_total_steps(trainer))
            bar.initial = trainer.global_step
            bar.n = trainer.global_step
        bar.set_description(f"Run (epoch {trainer.current_epoch})")

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        step = trainer.global_step
        bar = self.train_progress_bar
        total = bar.total
        if self.refresh_rate and (step % self.refresh_rate == 0 or (total is not None and step >= total)):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        bar = self.train_progress_bar
        bar.n = trainer.global_step
        if not bar.disable:
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
        # The bar stays open across epochs; it is closed at the end of training.


class RunTimeEstimate(Callback):
    """After ``after_steps`` measured steps, print the estimated time of the whole run.

    The first ``skip_steps`` steps are not timed (start-up: data loader workers, lazy initialisation).
    Without a GPU, when the estimate exceeds ``long_run_s``, the message is a warning that names the
    fast alternatives. Validation time is not included (the message says so).
    """

    def __init__(self, after_steps: int = 5, skip_steps: int = 1, long_run_s: float = 15 * 60) -> None:
        self.after_steps, self.skip_steps, self.long_run_s = after_steps, skip_steps, long_run_s
        self._t0: Optional[float] = None
        self._s0 = 0
        self.estimate_s: Optional[float] = None
        self.message: Optional[str] = None

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._t0, self._s0, self.estimate_s, self.message = None, trainer.global_step, None, None

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        if self.message is not None:
            return
        step = trainer.global_step
        if step - self._s0 == self.skip_steps:
            self._t0 = time.perf_counter()
            return
        if self._t0 is None or step - self._s0 < self.skip_steps + self.after_steps:
            return
        per_step = (time.perf_counter() - self._t0) / (step - self._s0 - self.skip_steps)
        total = _total_steps(trainer)
        if total is None:
            return
        self.estimate_s = per_step * max(0, total - step)
        device = trainer.strategy.root_device
        head = (f"run time estimate: {per_step:.2f} s/step on {device.type.upper()} -> "
                f"{max(0, total - step)} more steps take about {format_duration(self.estimate_s)} "
                f"(validation not included; measured over {self.after_steps} steps)")
        if device.type == "cpu" and self.estimate_s > self.long_run_s:
            self.message = (
                f"{head}. No GPU is used. Fast alternatives on a CPU: {CPU_RECIPE}, a shorter run "
                f"(trainer.max_steps=N), or the synthetic smoke run (make train DATASET=synthetic). "
                f"CPU threads: trainer.num_threads (now {_threads()}).")
            rank_zero_warn(self.message)
        else:
            self.message = head
            rank_zero_info(head)


# The CPU recipe the long-run warning names, with what docs/RESULTS.md measured for it (table 1).
CPU_RECIPE = ("experiment=dsrh_finetune (CIFAR-10: EfficientNet-Lite0 at 96 px, its top 3 blocks fine-tuned on "
              "cached lower-block outputs; 0.650 test MAP@all at 48 bits, 3 seeds, 4.3-4.9 minutes a run plus a "
              "one-time cache extraction of about 3 minutes on 2 cores; see docs/RESULTS.md)")


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class ValidateAtEnd(Callback):
    """Ask Lightning to stop at the last step: its loop then validates that step (unless it just did).

    Lightning validates after a batch when ``trainer.should_stop`` is set, so the final step always gets
    a validation (the best-checkpoint selection and ``val/map`` see the end of training), even when
    ``max_steps`` is not a multiple of ``val_check_interval``.
    """

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs, batch,
                           batch_idx: int) -> None:
        if is_final_batch(trainer, batch_idx):
            trainer.should_stop = True
