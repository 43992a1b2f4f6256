"""End-to-end: the real configs composed for a seconds-long CPU run through fit, evaluation, checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO
from dsrh_lightning.config import load_config
from dsrh_lightning.train import train

pytestmark = pytest.mark.slow


def test_train_synthetic_end_to_end(tiny_overrides, tmp_path):
    cfg = load_config(tiny_overrides)
    results = train(cfg)
    run = Path(results["run_dir"])
    assert (run / "config.yaml").is_file() and (run / "split.npz").is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert results["best_checkpoint"] and Path(results["best_checkpoint"]).is_file()
    for key in ("val/map", "test/map", "test/precision_radius"):
        assert 0.0 <= results[key] <= 1.0, key
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["test/map"] == results["test/map"]
    # The checkpoint carries the resolved config as hyperparameters.
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["model"]["bits"] == cfg.model.bits


@pytest.mark.parametrize("experiment", ["drh", "drh_plus", "dsrh_balanced"])
def test_every_experiment_config_runs(experiment, tiny_overrides):
    over = tiny_overrides + [f"experiment={experiment}", "trainer.max_steps=4", "trainer.val_check_interval=4",
                             "trainer.test_after_fit=false"]
    if experiment == "dsrh_balanced":
        over += ["data.batch_size=16", "data.images_per_class=4"]
    results = train(load_config(over))
    assert 0.0 <= results["val/map"] <= 1.0


def test_learning_beats_chance_on_synthetic(tiny_overrides):
    """A short run on the structured synthetic set must rank far better than random codes (MAP ~ 0.1)."""
    over = tiny_overrides + ["data.synthetic_per_class=60", "data.protocol.train_per_class=40",
                             "trainer.max_steps=60", "trainer.val_check_interval=30", "model.bits=16"]
    results = train(load_config(over))
    assert results["test/map"] > 0.3, results


def test_cli_train_and_bad_override(tiny_overrides, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    cmd = [sys.executable, "-m", "dsrh_lightning.cli", "train"]
    bad = subprocess.run(cmd + ["dataset=synthetic", "model.bitz=12"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "model.bitz" in bad.stderr and "Traceback" not in bad.stderr
    args = [a if a.startswith("dataset=") else "--" + a for a in tiny_overrides]  # W&B agent form
    ok = subprocess.run(cmd + args + ["--trainer.max_steps=4", "--trainer.val_check_interval=4"],
                        capture_output=True, text=True, env=env, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    out = json.loads(ok.stdout[ok.stdout.index("{"):])
    assert 0.0 <= out["test/map"] <= 1.0


def test_missing_cifar_data_fails_before_training(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    r = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "train", "dataset=cifar10",
                        f"data.root={tmp_path / 'empty'}", "data.download=false", f"output_dir={tmp_path}"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "CIFAR-10 not found" in r.stderr and str(tmp_path / "empty") in r.stderr
