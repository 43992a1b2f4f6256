"""Exact resume at every boundary: a run stopped after a checkpoint (in-process, SIGKILL, SIGINT, SIGTERM)
and continued with resume=auto ends with weights bit-identical to an uninterrupted run."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dsrh_lightning import module as module_lib
from dsrh_lightning.config import load_config
from dsrh_lightning.train import train

# 10 classes x 8 training images = 80 triplets = 5 batches of 16 per epoch; 12 steps cross 2 epoch ends.
BASE = ["data.protocol.train_per_class=8", "trainer.max_steps=12", "trainer.deterministic=true",
        "trainer.test_after_fit=false", "data.num_workers=0", "logger.name=none", "model.backbone=small_cnn",
        "trainer.checkpoint_every_minutes=0"]
# (overrides, step at which the process dies, step of the last checkpoint before it)
CASES = {
    # checkpoint at the LAST batch of epoch 0 (step 5), killed during epoch 1
    "epoch_end_by_steps": (["trainer.val_check_interval=100", "trainer.checkpoint_every_n_steps=5"], 7, 5),
    # mid-epoch checkpoint (step 6 = batch 1 of epoch 1)
    "mid_epoch": (["trainer.val_check_interval=4", "trainer.checkpoint_every_n_steps=3"], 8, 6),
    # validation at each epoch end writes last.ckpt (step 5 and 10)
    "validate_each_epoch": (["trainer.val_check_interval=0", "trainer.checkpoint_every_n_steps=0"], 7, 5),
}


class _Killed(Exception):
    pass


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_same_weights(a_path, b_path):
    a, b = _state(a_path)["state_dict"], _state(b_path)["state_dict"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture
def steps_trained(monkeypatch):
    steps = []
    orig = module_lib.HashingModule.training_step

    def counting(self, batch, batch_idx):
        steps.append((self.current_epoch, self.global_step))
        return orig(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.HashingModule, "training_step", counting)
    return steps


@pytest.mark.parametrize("case", sorted(CASES))
def test_stopped_run_resumes_exactly(case, tiny_overrides, monkeypatch, steps_trained):
    over, kill_at, saved_at = CASES[case]
    base = tiny_overrides + BASE + over
    full = train(load_config(base + ["name=full"]))
    assert full["global_step"] == 12
    uninterrupted = list(steps_trained)
    assert [e for e, _ in uninterrupted] == [0] * 5 + [1] * 5 + [2] * 2

    def die(self, outputs, batch, batch_idx):
        if self.global_step == kill_at:
            raise _Killed()

    monkeypatch.setattr(module_lib.HashingModule, "on_train_batch_end", die, raising=False)
    with pytest.raises(_Killed):
        train(load_config(base + ["name=killed"]))
    monkeypatch.undo()
    last = Path(full["run_dir"]).parent / "killed" / "checkpoints" / "last.ckpt"
    assert _state(last)["global_step"] == saved_at

    steps_trained.clear()
    monkeypatch.setattr(module_lib.HashingModule, "training_step",
                        _counting(module_lib.HashingModule.training_step, steps_trained))
    resumed = train(load_config(base + ["name=killed", "resume=auto"]))
    # The same (epoch, step) sequence as the uninterrupted run from the checkpoint on: no epoch skipped.
    assert steps_trained == uninterrupted[saved_at:]
    _assert_same_weights(full["last_checkpoint"], resumed["last_checkpoint"])
    assert not list(last.parent.glob("last-v*.ckpt"))  # one owner of last.ckpt


def _counting(orig, steps):
    def counting(self, batch, batch_idx):
        steps.append((self.current_epoch, self.global_step))
        return orig(self, batch, batch_idx)
    return counting
