"""End-to-end: the real configs composed for a seconds-long CPU run through fit, evaluation, checkpoint."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO
from dsrh_lightning.config import load_config
from dsrh_lightning.runs.train import train

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
    # `dsrh eval` on the best checkpoint reproduces the test metrics of the run.
    from dsrh_lightning.runs.evaluate import evaluate_checkpoint

    again = evaluate_checkpoint(Path(results["best_checkpoint"]), ["trainer.progress_bar=false"])
    assert again["test/map"] == pytest.approx(results["test/map"], abs=1e-9)
    assert again["test/precision_radius"] == pytest.approx(results["test/precision_radius"], abs=1e-9)


EXPERIMENTS = sorted(p.stem for p in (REPO / "experiments" / "configs" / "experiment").glob("*.yaml"))
# What a file needs to run on the tiny synthetic set: balanced batches that fit 16 images, and the hash layer on
# the last layer of the small CNN (fc6 + fc7 exist in VGG only).
_TINY = {"balanced": ["data.batch_size=16", "data.images_per_class=4"], "last_two": ["model.hash_input=last"]}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_config_runs(experiment, tiny_overrides):
    """Every experiment file trains a few steps and evaluates on the test queries."""
    cfg = OmegaConf.load(REPO / "experiments" / "configs" / "experiment" / f"{experiment}.yaml")
    over = [f"experiment={experiment}", "trainer.max_steps=3", "trainer.val_check_interval=3",
            "trainer.test_after_fit=true", "logger.name=none", "data.num_workers=0", "trainer.log_every_n_steps=1"]
    if OmegaConf.select(cfg, "data.sampling") in ("balanced", "auto"):  # auto: balanced on the single-label set
        over += _TINY["balanced"]
    if OmegaConf.select(cfg, "model.hash_input") == "last_two":
        over += _TINY["last_two"]
    results = train(load_config(tiny_overrides + over))
    assert results["global_step"] == 3
    assert 0.0 <= results["val/map"] <= 1.0 and 0.0 <= results["test/map"] <= 1.0


def test_every_experiment_file_is_smoke_tested():
    assert len(EXPERIMENTS) >= 12 and {"dsrh", "dsrh_tuned", "dsrh_zhao", "csq", "debug"} <= set(EXPERIMENTS)


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


def _list_overrides(root, tmp_path, dataset):
    return [f"dataset={dataset}", f"data.root={root}", f"output_dir={tmp_path / 'runs'}", "name=lists",
            "data.train_list=train.txt", "data.query_list=test.txt", "data.database_list=database.txt",
            "data.num_labels=6", "data.protocol.val_per_class=2", "data.protocol.val_database_size=0",
            "model.backbone=small_cnn", "model.weights=none", "model.bits=12", "data.image_size=32",
            "data.batch_size=8", "data.eval_batch_size=64", "data.num_workers=0", "data.split_dir=",
            "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.progress_bar=false",
            "trainer.accelerator=cpu", "logger.name=csv", "eval.topk=50", "eval.ndcg_k=20", "eval.acg_k=20",
            "eval.wmap_topk=50"]


@pytest.mark.parametrize("experiment", ["dsrh_yao", "dsrh_zhao"])
def test_train_on_nuswide_layout_folder(tmp_path, experiment):
    from dsrh_lightning.data.synthetic_folder import write_synthetic_list_dataset

    root = tmp_path / "nuswide"
    write_synthetic_list_dataset(root, num_labels=6, n=160, query=20, train=60)
    over = _list_overrides(root, tmp_path, "nuswide") + [f"experiment={experiment}", "model.hash_input=last"]
    results = train(load_config(over))
    for key in ("test/map", "test/ndcg", "test/acg", "test/wmap", "val/map"):
        assert key in results and results[key] >= 0.0, key
    assert results["test/ndcg"] <= 1.0 and results["test/num_queries"] == 20


def test_train_custom_single_label_lists(tmp_path):
    from dsrh_lightning.data.synthetic_folder import write_synthetic_list_dataset

    root = tmp_path / "mine"
    write_synthetic_list_dataset(root, num_labels=6, n=160, query=20, train=60, multilabel=False)
    over = [o for o in _list_overrides(root, tmp_path, "custom") if not o.startswith("data.num_labels")]
    results = train(load_config(over))
    assert 0.0 <= results["test/map"] <= 1.0 and results["test/num_database"] == 140


@pytest.mark.parametrize("multilabel, resolved", [(True, "random"), (False, "balanced")])
def test_default_dsrh_samples_by_the_labels_and_resumes(tmp_path, multilabel, resolved):
    """experiment=dsrh leaves data.sampling to the labels (auto): class-balanced batches for class ids, shuffled
    batches for multi-hot labels. config.yaml and the checkpoint record the choice, and the run continues with
    data.sampling still auto."""
    from dsrh_lightning.data.synthetic_folder import write_synthetic_list_dataset

    root = tmp_path / "data"
    write_synthetic_list_dataset(root, num_labels=6, n=160, query=20, train=60, multilabel=multilabel)
    over = _list_overrides(root, tmp_path, "nuswide" if multilabel else "custom")
    if not multilabel:
        over = [o for o in over if not o.startswith("data.num_labels")]
    over += ["experiment=dsrh", "model.hash_input=last", "data.images_per_class=4"]
    cfg = load_config(over)
    assert cfg.data.sampling == "auto"
    results = train(cfg)
    run = Path(results["run_dir"])
    assert OmegaConf.load(run / "config.yaml").data.sampling == resolved
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["data"]["sampling"] == resolved
    more = train(load_config(over + ["resume=auto", "trainer.max_steps=6", "trainer.val_check_interval=2"]))
    assert more["global_step"] == 6 and OmegaConf.load(run / "config.yaml").data.sampling == resolved
