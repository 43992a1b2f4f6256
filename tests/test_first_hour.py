"""The first hour: whole-run progress, run-time estimate, final validation, precision/threads resolved and
recorded, W&B summary of the best val/map and the best checkpoint as an artifact, results vs thread count."""

import csv
import os
import glob
import struct
import warnings
from types import SimpleNamespace

import pytest
import torch
import yaml

from dsrh_lightning.lightning import resources
from dsrh_lightning.lightning.callbacks import progress
from dsrh_lightning.lightning.callbacks.progress import RunTimeEstimate, format_duration
from dsrh_lightning.config import ConfigError, load_config
from dsrh_lightning.runs.train import train


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---- precision=auto, num_threads=0 ------------------------------------------------------------------------

def test_precision_auto_is_the_default_and_resolves_by_device(monkeypatch):
    cfg = load_config([])
    assert cfg.trainer.precision == "auto" and cfg.trainer.num_threads == 0
    for value in ("32", "32-true", "bf16-mixed", "16-mixed"):  # every earlier value stays valid, unchanged
        assert resources.resolve_precision(load_config([f"trainer.precision={value}"]).trainer) == value
    monkeypatch.setattr(resources, "_cuda_bf16", lambda: False)
    assert resources.resolve_precision(cfg.trainer) == "32-true"
    monkeypatch.setattr(resources, "_cuda_bf16", lambda: True)  # a bf16-capable GPU
    assert resources.resolve_precision(cfg.trainer) == "bf16-mixed"
    assert resources.resolve_precision(load_config(["trainer.accelerator=cpu"]).trainer) == "32-true"
    with pytest.raises(ConfigError, match="trainer.num_threads"):
        load_config(["trainer.num_threads=-1"])


def test_num_threads_auto_is_the_physical_cores_shared_by_cpu_ranks(monkeypatch):
    assert 1 <= resources.physical_cores() <= resources.available_cpus()
    monkeypatch.setattr(resources, "physical_cores", lambda: 8)
    assert resources.resolve_threads(load_config([]).trainer) == 8
    assert resources.resolve_threads(load_config(["trainer.accelerator=cpu", "trainer.devices=2"]).trainer) == 4
    assert resources.resolve_threads(load_config(["trainer.num_threads=3"]).trainer) == 3


# ---- the run-time estimate -----------------------------------------------------------------------------

def test_format_duration():
    assert [format_duration(s) for s in (42, 600, 3 * 3600 + 5 * 60, 46 * 3600, 50 * 3600)] == [
        "42 s", "10 min", "3 h 05 min", "46 h 00 min", "2 d 02 h"]


def _fake_trainer(device, max_steps):
    return SimpleNamespace(global_step=0, max_steps=max_steps, max_epochs=-1, num_training_batches=78,
                           strategy=SimpleNamespace(root_device=torch.device(device)))


@pytest.mark.parametrize("device,max_steps,long", [("cpu", 10000, True), ("cpu", 50, False), ("cuda", 10000, False)])
def test_run_time_estimate_from_the_first_steps(monkeypatch, device, max_steps, long):
    clock = {"t": 100.0}
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock["t"])
    cb, tr = RunTimeEstimate(after_steps=8, skip_steps=2), _fake_trainer(device, max_steps)
    cb.on_train_start(tr, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in range(1, 13):
            tr.global_step = step
            clock["t"] += 30.0 if step <= 2 else 16.5  # slow start-up steps are not timed
            cb.on_train_batch_end(tr, None, None, None, step - 1)
            if step < 10:
                assert cb.message is None
    # 16.5 s/step measured over steps 3..10; 10000 - 10 steps left.
    assert cb.estimate_s == pytest.approx(16.5 * (max_steps - 10))
    assert format_duration(16.5 * (max_steps - 10)) in cb.message
    warned = [str(w.message) for w in caught]
    if long:
        assert len(warned) == 1 and "No GPU" in warned[0]
        assert "experiment=dsrh_finetune" in warned[0] and "DATASET=synthetic" in warned[0]
    else:
        assert not any("No GPU" in w for w in warned) and "No GPU" not in cb.message


# ---- one tiny W&B-offline run: progress bar, final validation, recorded settings, W&B summary and artifact -----

def _wandb_records(path, block=32768):
    """Records of a .wandb file (LevelDB-style log: 7-byte header, 32 KiB blocks, FULL/FIRST/MIDDLE/LAST)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B"
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind == 1:
            chunk, buf = chunk, b""
        elif kind == 2:
            buf = chunk
            continue
        elif kind == 3:
            buf += chunk
            continue
        elif kind == 4:
            chunk, buf = buf + chunk, b""
        record = pb.Record()
        record.ParseFromString(chunk)
        yield record


def test_tiny_wandb_run_validates_the_last_step_and_reports_the_best(tiny_overrides, tmp_path, restore_threads):
    over = [o for o in tiny_overrides if not o.startswith(("logger.name=", "trainer.progress_bar="))]
    # 7 steps, validation every 4: Lightning alone would validate step 4 only.
    cfg = load_config(over + ["logger.name=wandb", "trainer.max_steps=7", "trainer.val_check_interval=4",
                              "trainer.test_after_fit=false", "trainer.progress_bar=true", "data.num_workers=0"])
    res = train(cfg)
    import wandb

    wandb.finish()  # flush the offline run (a CLI process does this at exit)
    run_dir = tmp_path / "runs" / "smoke"
    assert res["global_step"] == 7
    best = res["best_checkpoint"]
    assert "val/map" in res and res["best_val_map"] == pytest.approx(max(res["val/map"], res["best_val_map"]))
    # Recorded: the resolved precision and thread count, in config.yaml and in the checkpoint.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "32-true"
    assert saved["trainer"]["num_threads"] == resources.physical_cores() == torch.get_num_threads()
    hp = torch.load(best, map_location="cpu", weights_only=False)["hyper_parameters"]["config"]
    assert hp["trainer"]["precision"] == "32-true" and hp["trainer"]["num_threads"] == saved["trainer"]["num_threads"]
    # W&B (offline): val/map summarised by its max, best_val_map in the summary, the best checkpoint as artifact.
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    metrics, summaries, artifacts, val_maps = {}, {}, [], []
    for r in _wandb_records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "metric" and r.metric.name:
            metrics[r.metric.name] = r.metric
        elif kind == "summary":
            summaries.update({u.key: u.value_json for u in r.summary.update})
        elif kind == "artifact":
            artifacts.append(r.artifact)
        elif kind == "history":
            val_maps += [float(i.value_json) for i in r.history.item if (i.key or "/".join(i.nested_key)) == "val/map"]
    assert metrics["val/map"].summary.max and not metrics["val/map"].summary.last
    assert len(val_maps) == 2  # step 4 and the final step 7
    assert float(summaries["best_val_map"]) == pytest.approx(max(val_maps), abs=1e-6)
    assert float(summaries["best_val_map"]) == pytest.approx(res["best_val_map"], abs=1e-6)
    (art,) = artifacts
    assert art.type == "model" and "best" in list(art.aliases)
    assert [m.path for m in art.manifest.contents] == ["best.ckpt"]
    assert art.manifest.contents[0].size == (run_dir / "checkpoints" / best.split("/")[-1]).stat().st_size


def test_whole_run_progress_bar_counts_steps_to_max_steps(tiny_overrides, restore_threads):
    from dsrh_lightning.lightning.callbacks.progress import RunProgressBar

    seen = {}
    orig = RunProgressBar.on_train_end

    def spy(self, trainer, pl_module):
        seen.update(total=self.train_progress_bar.total, n=self.train_progress_bar.n, epoch=trainer.current_epoch)
        return orig(self, trainer, pl_module)

    over = [o for o in tiny_overrides if not o.startswith("trainer.progress_bar=")]
    RunProgressBar.on_train_end = spy
    try:
        # 20 training images / 16 per batch = 2 batches an epoch: 5 steps span 3 epochs.
        train(load_config(over + ["trainer.progress_bar=true", "trainer.max_steps=5", "trainer.val_check_interval=100",
                                  "trainer.test_after_fit=false", "data.protocol.train_per_class=2",
                                  "data.num_workers=0"]))
    finally:
        RunProgressBar.on_train_end = orig
    assert seen["total"] == 5 and seen["n"] == 5 and seen["epoch"] >= 1


# ---- results vs thread count -----------------------------------------------------------------------------

def _losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


def test_one_and_two_threads_agree_within_float_noise(tiny_overrides, tmp_path, restore_threads):
    """Every random draw is seeded by position, so the thread count only changes float rounding."""
    runs = {}
    for n in (1, 2):
        cfg = load_config(tiny_overrides + [f"trainer.num_threads={n}", f"name=t{n}", "trainer.log_every_n_steps=1",
                                            "data.num_workers=0"])
        runs[n] = train(cfg)
        assert yaml.safe_load((tmp_path / "runs" / f"t{n}" / "config.yaml").read_text())["trainer"]["num_threads"] == n
    l1, l2 = _losses(tmp_path / "runs" / "t1"), _losses(tmp_path / "runs" / "t2")
    assert sorted(l1) == sorted(l2) == list(range(12))
    for step in l1:  # a different random draw would change a loss by far more than 1e-4
        assert l1[step] == pytest.approx(l2[step], rel=1e-4, abs=1e-5), step
    w1 = torch.load(runs[1]["last_checkpoint"], weights_only=True)["state_dict"]
    w2 = torch.load(runs[2]["last_checkpoint"], weights_only=True)["state_dict"]
    # Rounding differences grow over the steps (element-wise they pass 1e-3 in the first conv, and a small
    # BatchNorm bias moves by ~1.5% of its norm); a different random draw would move the weights as a whole
    # by far more than 1% of their norm.
    keys = [k for k in w1 if w1[k].is_floating_point()]
    a, b = (torch.cat([w[k].flatten() for k in keys]) for w in (w1, w2))
    rel = float((a - b).norm() / a.norm())
    assert rel < 1e-2, rel
    for key in ("val/map", "test/map"):
        assert runs[1][key] == pytest.approx(runs[2][key], abs=0.02), key


def test_training_metrics_reach_the_logger_on_every_log_step(tiny_overrides, tmp_path):
    """train/* metrics are logged on Lightning's log steps (every trainer.log_every_n_steps), all of them there."""
    train(load_config(tiny_overrides + ["name=logs", "trainer.log_every_n_steps=4", "trainer.max_steps=12",
                                        "data.num_workers=0"]))
    with open(tmp_path / "runs" / "logs" / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    assert [int(r["step"]) for r in rows] == [3, 7, 11]
    for r in rows:
        for key in ("train/loss", "train/ranking", "train/orth", "train/cls", "train/bit_balance"):
            assert r.get(key) not in (None, ""), (key, r["step"])
        assert float(r["train/loss"]) > 0


def test_the_terminal_shows_no_tips_and_no_misleading_save_message(tmp_path):
    """Lightning's litlogger tip and the "`weights_only` was not set" line of each save stay off the terminal;
    the run's own lines and Lightning's useful ones still show."""
    import subprocess
    import sys

    from conftest import REPO

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = ["dataset=synthetic", "model.backbone=small_cnn", "model.weights=none", "logger.name=none",
            "data.synthetic_per_class=20", "data.protocol.query_per_class=2", "data.protocol.train_per_class=8",
            "data.protocol.val_per_class=2", "data.batch_size=16", "data.num_workers=0", "trainer.max_steps=3",
            "trainer.val_check_interval=2", "trainer.progress_bar=false", "trainer.test_after_fit=false",
            f"output_dir={tmp_path}", "name=quiet"]
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "train", *args], capture_output=True,
                          text=True, env=env, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "litlogger" not in out and "weights_only` was not set" not in out, out
    assert "data: synthetic" in out and "`Trainer.fit` stopped: `max_steps=3` reached" in out


def test_the_sweep_engine_imports_without_its_pydantic_warnings():
    import subprocess
    import sys

    from conftest import REPO

    code = ("import warnings; from dsrh_lightning.runs.sweep_local import _sweeps; _sweeps(); "
            "warnings.warn('a useful warning', UserWarning)")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pydantic" not in proc.stderr and "Valid config keys" not in proc.stderr, proc.stderr
    assert "a useful warning" in proc.stderr
