"""Sweep files against W&B's own schema and our config schema; sweep-local driven by a fake trainer."""

import json
import subprocess

import pytest
import yaml
from sweeps import schema_violations_from_proposed_config

from conftest import REPO
from dsrh_lightning.config import load_config
from dsrh_lightning.sweep_local import (SweepError, load_sweep, run_overrides, run_sweep_local, sample_values)

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
    assert sweep["metric"]["name"] == "val/map"
    # Every swept value, passed the way an agent passes it, must load into the typed config.
    for key, spec in sweep["parameters"].items():
        for value in sample_values(spec):
            load_config(run_overrides(sweep, {key: value}))


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
    assert calls[0][-3:] == ["dataset=synthetic", f"output_dir={out}", "name=bits-000"]
    assert first[1]["history"] == [{"val/map": 24 / 50}]  # the best validation MAP is fed back
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
    assert records[2]["history"] == [{"val/map": 1.0 - abs(seen_runs[2] - 0.01)}]
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
    assert f"{venv}/bin/wandb agent --count 2 me/proj/abc" in out
