"""End to end: exact resume, NaN stop, bf16-mixed, 2-process DDP (gloo) = 1 process, sweep-local with real runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dsrh_lightning.lightning import module as module_lib
from dsrh_lightning.config import load_config
from dsrh_lightning.runs.train import train

pytestmark = pytest.mark.slow

# 10 classes x 8 training images = 80 triplets = 5 batches of 16 per epoch: 12 steps cross 2 epoch ends.
RESUME = ["data.protocol.train_per_class=8", "trainer.max_steps=12", "trainer.val_check_interval=4",
          "trainer.checkpoint_every_n_steps=3", "trainer.deterministic=true", "trainer.test_after_fit=false",
          "data.num_workers=0"]


class _Killed(Exception):
    pass


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


def test_killed_run_resumes_to_the_same_weights(tiny_overrides, tmp_path, monkeypatch):
    base = tiny_overrides + RESUME
    full = train(load_config(base + ["name=full"]))
    assert full["global_step"] == 12

    orig = module_lib.HashingModule.on_train_batch_end

    def kill_after_8(self, outputs, batch, batch_idx):
        if self.global_step == 8:
            raise _Killed("simulated kill")

    monkeypatch.setattr(module_lib.HashingModule, "on_train_batch_end", kill_after_8, raising=False)
    with pytest.raises(_Killed):
        train(load_config(base + ["name=killed"]))
    last = Path(full["run_dir"]).parent / "killed" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 6  # steps 7-8 are lost

    monkeypatch.setattr(module_lib.HashingModule, "on_train_batch_end", orig, raising=False)
    steps = []
    orig_step = module_lib.HashingModule.training_step

    def counting(self, batch, batch_idx):
        steps.append(self.global_step)
        return orig_step(self, batch, batch_idx)

    monkeypatch.setattr(module_lib.HashingModule, "training_step", counting)
    resumed = train(load_config(base + ["name=killed", "resume=auto"]))
    assert steps == list(range(6, 12))  # continued mid-epoch 1 (batch 1 of 5), not restarted
    a, b = _weights(full["last_checkpoint"]), _weights(resumed["last_checkpoint"])
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_overrides, monkeypatch):
    orig = module_lib.combine_losses

    def poisoned(*args, **kw):
        out = orig(*args, **kw)
        if poisoned.module.global_step >= 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    orig_step = module_lib.HashingModule.training_step

    def step(self, batch, batch_idx):
        poisoned.module = self
        return orig_step(self, batch, batch_idx)

    monkeypatch.setattr(module_lib, "combine_losses", poisoned)
    monkeypatch.setattr(module_lib.HashingModule, "training_step", step)
    cfg = load_config(tiny_overrides + ["trainer.checkpoint_every_n_steps=3", "trainer.val_check_interval=100"])
    with pytest.raises(FloatingPointError, match="non-finite loss at step 7.*last good checkpoint"):
        train(cfg)
    last = Path(cfg.output_dir) / "smoke" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 6
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())


def test_bf16_mixed_cpu_smoke(tiny_overrides):
    res = train(load_config(tiny_overrides + ["trainer.precision=bf16-mixed", "trainer.max_steps=4",
                                              "trainer.val_check_interval=4"]))
    assert 0.0 <= res["val/map"] <= 1.0 and 0.0 <= res["test/map"] <= 1.0


def _cli(args, timeout=400):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_ddp_two_process_training_runs_and_evaluation_matches_one_process(tiny_overrides, tmp_path):
    # 5 classes: 25 test queries and 7 val queries do not split evenly over 2 ranks (the sampler pads).
    over = tiny_overrides + ["data.synthetic_classes=5", "data.protocol.val_per_class=7", "data.eval_batch_size=8",
                             "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.test_after_fit=false",
                             "name=ddp"]
    ddp = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu"]
    r = _cli(["train", *over, *ddp])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Starting with 2 processes" in r.stdout + r.stderr
    ckpt = tmp_path / "runs" / "ddp" / "checkpoints" / "last.ckpt"
    one = _cli(["eval", "--ckpt", str(ckpt), "--json", "trainer.accelerator=cpu", "trainer.devices=1"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = _cli(["eval", "--ckpt", str(ckpt), "--json", *ddp])
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Starting with 2 processes" in two.stdout + two.stderr
    m1 = json.loads(one.stdout.strip().splitlines()[-1])
    m2 = json.loads(two.stdout.strip().splitlines()[-1])
    assert m1 == m2 and "test/map" in m1


def test_sweep_local_three_tiny_offline_runs(tiny_overrides, tmp_path):
    extra = [o for o in tiny_overrides if not o.startswith(("output_dir=", "name=", "logger.name="))]
    extra += ["trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.test_after_fit=false",
              "logger.name=wandb"]
    out = tmp_path / "sweep"
    r = _cli(["sweep-local", "bits.yaml", "--count", "3", "--output-dir", str(out), *extra], timeout=550)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    state = json.loads((out / "sweep_state.json").read_text())
    assert [run["config"]["model.bits"]["value"] for run in state["runs"]] == [12, 24, 32]
    for run in state["runs"]:
        assert run["state"] == "finished" and 0.0 <= run["history"][0]["best_val_map"] <= 1.0
        run_dir = out / run["name"]
        assert "model:\n  backbone: small_cnn" in (run_dir / "config.yaml").read_text()
        assert f"bits: {run['config']['model.bits']['value']}" in (run_dir / "config.yaml").read_text()
        run_id = (run_dir / "wandb_run_id").read_text().strip()
        offline = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
        assert offline, f"no offline W&B run with id {run_id} in {run_dir / 'wandb'}"
