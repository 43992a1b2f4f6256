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
from dsrh_lightning.lightning import module as module_lib
from dsrh_lightning.config import load_config
from dsrh_lightning.runs.train import train

pytestmark = pytest.mark.slow  # real training runs (seconds each on an idle machine)

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


# --- real processes: SIGKILL (nothing runs after it), SIGINT and SIGTERM (last.ckpt written, clean exit) ---
# Validation at each epoch end (steps 5, 10) and last.ckpt every 4 steps: checkpoints at 4, 5, 8, 10, 12.
PROC = ["trainer.val_check_interval=0", "trainer.checkpoint_every_n_steps=4"]

_CHILD = textwrap.dedent("""
    import os, sys, time
    from dsrh_lightning.lightning import module as m
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.train import train
    at, marker, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    def hold(self, outputs, batch, batch_idx):  # after the callbacks of step `at`: tell the parent, wait
        if self.global_step == at:
            open(marker, "w").close()
            while not os.path.exists(go):
                time.sleep(0.02)
    m.HashingModule.on_train_batch_end = hold
    train(load_config(sys.argv[4:]))
""")


def _overrides(root: Path, name: str):
    return ["dataset=synthetic", f"output_dir={root}", f"name={name}", "data.synthetic_per_class=20",
            "data.protocol.query_per_class=2", "data.protocol.val_per_class=2", "data.batch_size=16",
            "data.eval_batch_size=64", "trainer.progress_bar=false", "trainer.accelerator=cpu", *BASE, *PROC]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("full")
    res = train(load_config(_overrides(root, "full")))
    assert res["global_step"] == 12
    return res["last_checkpoint"]


@pytest.mark.parametrize("sig,hold_at,saved_at,code,group", [
    (signal.SIGKILL, 6, 5, -signal.SIGKILL, False),   # last.ckpt from the epoch-0-end validation
    (signal.SIGKILL, 9, 8, -signal.SIGKILL, False),   # last.ckpt mid-epoch 1
    (signal.SIGINT, 7, 8, 128 + signal.SIGINT, False),  # the signal's step finishes, then last.ckpt
    (signal.SIGTERM, 2, 3, 128 + signal.SIGTERM, False),
    # `timeout` / SLURM / kill of a job signal the whole process group, DataLoader workers included.
    (signal.SIGTERM, 2, 3, 128 + signal.SIGTERM, True),
], ids=["sigkill-epoch-end", "sigkill-mid-epoch", "sigint", "sigterm", "sigterm-group-with-workers"])
def test_signalled_process_resumes_exactly(sig, hold_at, saved_at, code, group, tmp_path, uninterrupted):
    marker, go = tmp_path / "held", tmp_path / "go"
    # Same thread count as this process: a different one changes float reduction order (not bit-identical).
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(torch.get_num_threads()))
    workers = ["data.num_workers=1"] if group else []
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(hold_at), str(marker), str(go),
                              *_overrides(tmp_path / "runs", "run"), *workers],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                             start_new_session=group)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert child.poll() is None, child.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "child never reached the step"
            time.sleep(0.05)
        if group:
            os.killpg(child.pid, sig)
        else:
            child.send_signal(sig)
        go.touch()
        out = child.communicate(timeout=300)[0]
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == code, out[-3000:]
    last = tmp_path / "runs" / "run" / "checkpoints" / "last.ckpt"
    if sig != signal.SIGKILL:
        assert "Traceback" not in out and "resume=auto" in out and str(last) in out, out[-3000:]
    assert _state(last)["global_step"] == saved_at
    assert not list(last.parent.glob(".*.tmp-*"))
    resumed = train(load_config(_overrides(tmp_path / "runs", "run") + ["resume=auto"]))
    assert resumed["global_step"] == 12
    _assert_same_weights(uninterrupted, resumed["last_checkpoint"])


# --- continuing a run that finished: "train 20 steps, then extend to 40" equals one run to 40 ---
# 10 classes x 20 training images, batches of 20: 10 steps an epoch; validation only at the last step.
EXTEND = ["data.synthetic_per_class=40", "data.protocol.query_per_class=5", "data.protocol.train_per_class=20",
          "data.protocol.val_per_class=5", "data.batch_size=20", "data.num_workers=0", "logger.name=none",
          "model.backbone=small_cnn", "model.weights=none", "trainer.deterministic=true",
          "trainer.test_after_fit=false", "trainer.val_check_interval=100", "trainer.checkpoint_every_minutes=0"]


@pytest.fixture(scope="module")
def straight_to_40(tmp_path_factory):
    root = tmp_path_factory.mktemp("straight")
    steps = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module_lib.HashingModule, "training_step",
                   _counting(module_lib.HashingModule.training_step, steps))
        res = train(load_config(["dataset=synthetic", f"output_dir={root}", "trainer.progress_bar=false",
                                 *EXTEND, "name=straight", "trainer.max_steps=40"]))
    assert res["global_step"] == 40
    return res["last_checkpoint"], steps


@pytest.mark.parametrize("first", [20, 15])  # finished at an epoch boundary, and mid-epoch
def test_continuing_a_finished_run_is_exact(first, straight_to_40, tmp_path, monkeypatch):
    straight_last, straight_steps = straight_to_40
    base = ["dataset=synthetic", f"output_dir={tmp_path}", "trainer.progress_bar=false", *EXTEND, "name=ext"]
    steps = []
    monkeypatch.setattr(module_lib.HashingModule, "training_step",
                        _counting(module_lib.HashingModule.training_step, steps))
    done = train(load_config(base + [f"trainer.max_steps={first}"]))
    assert done["global_step"] == first and _state(done["last_checkpoint"])["global_step"] == first
    extended = train(load_config(base + ["trainer.max_steps=40", "resume=auto"]))
    assert extended["global_step"] == 40
    # The same (epoch, step) sequence: no batch repeated, no epoch skipped; then the same weights.
    assert steps == straight_steps
    _assert_same_weights(straight_last, extended["last_checkpoint"])
    a, b = _state(straight_last), _state(extended["last_checkpoint"])
    assert a["epoch"] == b["epoch"]
    assert a["loops"]["fit_loop"]["state_dict"] == b["loops"]["fit_loop"]["state_dict"]
