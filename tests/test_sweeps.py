"""Sweep files against W&B's own schema and our config schema; sweep-local driven by a fake trainer."""

import json
import subprocess

import pytest
import yaml
from sweeps import schema_violations_from_proposed_config

from conftest import REPO
from dsrh_lightning.config import load_config
from dsrh_lightning.losses.from_config import check_loss_config
from dsrh_lightning.runs.sweep_local import (SweepError, load_sweep, run_overrides, run_sweep_local, sample_values)

SWEEP_FILES = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def test_there_are_sweep_files_for_each_axis():
    swept = set()
    for f in SWEEP_FILES:
        swept |= set(yaml.safe_load(f.read_text())["parameters"])
    for key in ("model.bits", "loss.orth_weight", "optim.lr", "model.bag_size", "loss.margin", "experiment"):
        assert key in swept, key


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.name)
def test_sweep_file_is_valid_for_wandb_and_our_schema(path):
    sweep = yaml.safe_load(path.read_text())
    assert schema_violations_from_proposed_config(sweep) == []
    # The metric checkpoint selection uses (the run's best validation MAP), not the last val/map.
    assert sweep["metric"] == {"name": "best_val_map", "goal": "maximize"}
    assert sweep["command"][:3] == ["${env}", "dsrh", "train"]  # dsrh from PATH (make agent puts .venv/bin there)
    # Every swept value, passed the way an agent passes it, must load into the typed config, and its loss
    # settings (loss.params included) must fit the ranking method's keyword arguments.
    for key, spec in sweep["parameters"].items():
        for value in sample_values(spec):
            check_loss_config(load_config(run_overrides(sweep, {key: value})))


def test_schema_check_catches_a_broken_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: gird\nparameters:\n  model.bits:\n    values: [12]\n")
    with pytest.raises(SweepError, match="bad.yaml"):
        load_sweep(bad)


def test_run_overrides_expand_the_agent_command():
    sweep = yaml.safe_load((REPO / "experiments/sweeps/bits.yaml").read_text())
    assert run_overrides(sweep, {"model.bits": 12, "seed": 0}) == [
        "dataset=cifar10", "experiment=dsrh", "--model.bits=12", "--seed=0"]


def test_grid_sweep_local_runs_every_point_and_continues(tmp_path):
    calls = []

    def fake(args, out, name):
        calls.append(args)
        bits = int(next(a.split("=")[1] for a in args if a.startswith("--model.bits=")))
        return 0, {"val/map": bits / 100, "best_val_map": bits / 50}

    out = tmp_path / "sw"
    first = run_sweep_local("bits.yaml", 2, ["dataset=synthetic"], out, run_fn=fake)
    assert [r["config"]["model.bits"]["value"] for r in first] == [12, 24]
    # resume=auto: a run that a killed sweep left unfinished continues instead of being refused
    assert calls[0][-4:] == ["dataset=synthetic", f"output_dir={out}", "name=bits-000", "resume=auto"]
    assert first[1]["history"] == [{"best_val_map": 24 / 50}]  # the best validation MAP is fed back
    rest = run_sweep_local("bits.yaml", 0, ["dataset=synthetic"], out, run_fn=fake)  # continue to the end
    assert [r["config"]["model.bits"]["value"] for r in rest] == [32, 48]
    state = json.loads((out / "sweep_state.json").read_text())
    assert [r["name"] for r in state["runs"]] == ["bits-000", "bits-001", "bits-002", "bits-003"]


def test_bayes_sweep_local_feeds_metrics_back(tmp_path):
    seen_runs = []

    def fake(args, out, name):
        lr = float(next(a.split("=")[1] for a in args if a.startswith("--optim.lr=")))
        seen_runs.append(lr)
        if len(seen_runs) == 2:
            return 1, None  # a crashed run is recorded as failed, the sweep goes on
        return 0, {"best_val_map": 1.0 - abs(lr - 0.01)}

    records = run_sweep_local("lr.yaml", 4, [], tmp_path / "b", seed=3, run_fn=fake)
    assert [r["state"] for r in records] == ["finished", "failed", "finished", "finished"]
    assert all(1e-4 <= lr <= 0.1 for lr in seen_runs) and len(set(seen_runs)) == 4
    assert records[2]["history"] == [{"best_val_map": 1.0 - abs(seen_runs[2] - 0.01)}]
    again = run_sweep_local("lr.yaml", 2, [], tmp_path / "c", seed=3, run_fn=fake)
    assert [r["config"] for r in again] == [r["config"] for r in records[:2]]  # seeded proposals
    with pytest.raises(SweepError, match="--count"):
        run_sweep_local("lr.yaml", 0, [], tmp_path / "d", run_fn=fake)


def test_make_targets_call_wandb_and_sweep_local(tmp_path):
    venv = tmp_path / "venv"  # dry run (-n): nothing is executed
    out = subprocess.run(["make", "-n", "sweep-local", "SWEEP=lr.yaml", "COUNT=3", "ARGS=dataset=synthetic",
                          f"VENV={venv}"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert f"{venv}/bin/dsrh sweep-local experiments/sweeps/lr.yaml --count 3 dataset=synthetic" in out
    out = subprocess.run(["make", "-n", "sweep", "SWEEP=bits.yaml", f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert f"{venv}/bin/wandb sweep experiments/sweeps/bits.yaml" in out
    out = subprocess.run(["make", "-n", "agent", "SWEEP_ID=me/proj/abc", "COUNT=2", f"VENV={venv}"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    assert f'PATH="{venv}/bin:$PATH" {venv}/bin/wandb agent --count 2 me/proj/abc </dev/null' in out
    assert "make sweep-local" in out  # the account check runs first


def test_a_run_without_its_metric_is_failed_in_the_state_file(tmp_path, capsys):
    def fake(args, out, name):  # exit 0, metrics.json written, but no validation ever ran
        return 0, {"global_step": 50, "test/map": 0.5}

    (record,) = run_sweep_local("bits.yaml", 1, ["dataset=synthetic"], tmp_path / "s", run_fn=fake)
    state = json.loads((tmp_path / "s" / "sweep_state.json").read_text())
    assert record["state"] == state["runs"][0]["state"] == "failed"
    assert "no best_val_map" in state["runs"][0]["error"] and "FAILED" in capsys.readouterr().out


def test_continuing_with_other_arguments_warns_and_names_the_difference(tmp_path, capsys):
    def fake(args, out, name):
        return 0, {"best_val_map": 0.5}

    out = tmp_path / "s"
    run_sweep_local("bits.yaml", 1, ["dataset=synthetic", "trainer.max_steps=50"], out, run_fn=fake)
    assert "WARNING" not in capsys.readouterr().err
    run_sweep_local("bits.yaml", 1, ["dataset=synthetic", "trainer.max_steps=50"], out, run_fn=fake)
    assert "WARNING" not in capsys.readouterr().err  # same arguments: no warning
    run_sweep_local("bits.yaml", 1, ["dataset=synthetic", "trainer.max_steps=80"], out, run_fn=fake, seed=1)
    err = capsys.readouterr().err
    assert "dropped: trainer.max_steps=50" in err and "added: trainer.max_steps=80" in err
    assert "--seed 0" in err and "--seed 1" in err


def _fake_venv(tmp_path):
    """A VENV for make whose python is this interpreter on the worktree and whose wandb records its calls."""
    import os
    import sys

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / ".installed").touch()  # newer than setup.cfg / pyproject.toml: make does not reinstall
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nPYTHONPATH={REPO / "src"} exec {sys.executable} "$@"\n')
    (venv / "bin" / "wandb").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "wandb_calls"}\n')
    for f in ("python", "wandb"):
        os.chmod(venv / "bin" / f, 0o755)
    return venv


@pytest.mark.parametrize("target", [["sweep", "SWEEP=lr.yaml"], ["agent", "SWEEP_ID=me/proj/abc"]])
def test_make_sweep_and_agent_fail_at_once_without_a_wandb_account(tmp_path, target):
    import os

    venv = _fake_venv(tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("WANDB_API_KEY", "NETRC", "WANDB_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.netrc
    r = subprocess.run(["make", *target, f"VENV={venv}"], cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "needs a W&B account" in r.stderr and "make sweep-local" in r.stderr
    assert not (tmp_path / "wandb_calls").exists()  # wandb (and its login prompt) never started
    env["WANDB_API_KEY"] = "x" * 40  # with a key it goes on to wandb, stdin closed
    r = subprocess.run(["make", *target, f"VENV={venv}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "wandb_calls").read_text().split()[0] == target[0]


def test_make_weights_only_when_asked(tmp_path):
    def dry(*args):
        return subprocess.run(["make", "-n", "train", f"VENV={tmp_path}/v", *args], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout

    assert "model.weights" not in dry("DATASET=synthetic")  # synthetic.yaml asks for none
    assert "model.weights" not in dry("DATASET=nuswide")  # nuswide.yaml asks for imagenet
    assert "model.weights=auto" in dry()  # cifar10: auto (ImageNet when it loads, else from scratch, warned)
    assert "model.weights=none" in dry("DATASET=nuswide", "WEIGHTS=none")


def test_make_clean_keeps_runs_and_clean_runs_asks(tmp_path):
    import shutil

    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "Makefile", repo / "Makefile")
    (repo / "runs" / "r1").mkdir(parents=True)
    (repo / ".pytest_cache").mkdir()
    r = subprocess.run(["make", "clean"], cwd=repo, capture_output=True, text=True, check=True)
    assert (repo / "runs" / "r1").is_dir() and not (repo / ".pytest_cache").exists()
    assert "make clean-runs" in r.stdout
    r = subprocess.run(["make", "clean-runs"], cwd=repo, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert r.returncode != 0 and "YES=1" in r.stderr and (repo / "runs").is_dir()  # no terminal: refuse
    subprocess.run(["make", "clean-runs", "YES=1"], cwd=repo, capture_output=True, text=True, check=True)
    assert not (repo / "runs").exists()


def test_make_benchmark_targets(tmp_path):
    for target, script in (("bench-throughput", "throughput.py"), ("bench-head", "head_speed.py"),
                           ("bench-mining", "bench_mining.py")):
        out = subprocess.run(["make", "-n", target, f"VENV={tmp_path}/v"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout
        assert f"{tmp_path}/v/bin/python -m benchmarks.{script.removesuffix('.py')}" in out


@pytest.mark.slow
def test_readme_sweep_local_command_records_a_metric_for_every_run(tmp_path):
    """README: `dsrh sweep-local bits.yaml --count 3 dataset=synthetic trainer.max_steps=50` (here made small:
    fewer images and steps, 2 runs). max_steps stays below synthetic's val_check_interval=100, as in the README,
    so only the final-step validation gives the runs their val/map."""
    import os
    import sys

    small = ["data.synthetic_per_class=30", "data.protocol.query_per_class=5", "data.protocol.train_per_class=10",
             "data.protocol.val_per_class=5", "data.batch_size=16", "trainer.test_after_fit=false",
             "trainer.progress_bar=false", "trainer.max_steps=4"]
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "dsrh_lightning.cli", "sweep-local", "bits.yaml", "--count", "2", "dataset=synthetic",
           "trainer.max_steps=50", *small, "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "FAILED" not in r.stdout
    state = json.loads((out / "sweep_state.json").read_text())
    assert [run["state"] for run in state["runs"]] == ["finished", "finished"]
    for run in state["runs"]:
        assert run["summary"]["global_step"] == 4
        assert 0.0 < run["history"][0]["best_val_map"] <= 1.0
        assert run["history"][0]["best_val_map"] == pytest.approx(run["summary"]["best_val_map"])
        assert list((out / run["name"] / "checkpoints").glob("best-step4-*.ckpt"))
