"""Run folders lose nothing: no silent reuse, one process per folder, resume=auto picks a run that can
continue, a deleted folder or a full disk stops with a clear error, a second signal names what is kept,
a changed thread count on resume is said and recorded."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO
from dsrh_lightning.config import load_config, save_config
from dsrh_lightning.errors import RunFolderError
from dsrh_lightning.files import WriteError
from dsrh_lightning.lightning import module as module_lib
from dsrh_lightning.lightning.callbacks import checkpoint as ck
from dsrh_lightning.runs import folders
from dsrh_lightning.runs.checkpoints import read_checkpoint
from dsrh_lightning.runs.train import train

@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# 10 classes x 8 training images = 80 triplets = 5 batches of 16 per epoch.
TINY = ["data.protocol.train_per_class=8", "trainer.test_after_fit=false", "data.num_workers=0", "logger.name=none",
        "model.backbone=small_cnn", "model.weights=none", "trainer.checkpoint_every_minutes=0",
        "trainer.val_check_interval=100", "trainer.max_steps=4"]


def _ckpt_step(path) -> int:
    return int(read_checkpoint(path)["global_step"])


def test_a_name_that_holds_a_run_is_not_reused_without_resume_or_overwrite(tiny_overrides, capsys):
    base = tiny_overrides + TINY + ["name=seq"]
    first = train(load_config(base))
    last = Path(first["last_checkpoint"])
    before = last.read_bytes()
    with pytest.raises(RunFolderError, match=r"already holds a run.*name=seq resume=auto.*overwrite=true"):
        train(load_config(base + ["model.bits=16", "trainer.max_steps=2"]))
    assert last.read_bytes() == before  # the 12-bit run is untouched
    # overwrite=true replaces it: no file of the earlier run stays.
    second = train(load_config(base + ["model.bits=16", "trainer.max_steps=2", "overwrite=true"]))
    assert "deleted the earlier run" in capsys.readouterr().out
    ckpts = sorted(Path(second["run_dir"], "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_ckpt_step(p) == 2 for p in ckpts)
    assert all(read_checkpoint(p)["hyper_parameters"]["config"]["model"]["bits"] == 16 for p in ckpts)


def test_a_locked_run_folder_is_refused_and_released_after_the_run(tiny_overrides, tmp_path):
    base = tiny_overrides + TINY + ["name=busy"]
    run_dir = tmp_path / "runs" / "busy"
    run_dir.mkdir(parents=True)
    held = folders.RunFolderLock(run_dir).acquire()  # another process's lock (flock is per open file)
    try:
        with pytest.raises(RunFolderError, match=rf"in use by another dsrh process \(pid {os.getpid()}"):
            train(load_config(base))
        assert not (run_dir / "config.yaml").exists()
    finally:
        held.release()
    res = train(load_config(base))
    again = folders.RunFolderLock(run_dir).acquire()  # the finished run let go of the folder
    again.release()
    assert res["global_step"] == 4


_HOLD = textwrap.dedent("""
    import sys, time
    from dsrh_lightning.runs.folders import RunFolderLock
    RunFolderLock(sys.argv[1]).acquire()
    open(sys.argv[2], "w").close()
    time.sleep(60)
""")


def test_a_folder_locked_by_another_process_is_refused(tmp_path):
    run_dir, ready = tmp_path / "runs" / "cc", tmp_path / "ready"
    run_dir.mkdir(parents=True)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path / 'runs'}", "name=cc"])
        with pytest.raises(RunFolderError, match=rf"pid {proc.pid}"):
            folders.claim_run_folder(cfg, run_dir, None)
    finally:
        proc.kill()
        proc.wait()
    lock, _ = folders.claim_run_folder(cfg, run_dir, None)  # the lock died with its process
    lock.release()


def test_generated_names_taken_in_the_same_second_get_a_suffix(tmp_path, monkeypatch):
    monkeypatch.setattr(folders.time, "strftime", lambda fmt: "20260101-000000")
    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}"])
    first, _ = folders.resolve_run(cfg)
    first.mkdir()
    second, _ = folders.resolve_run(cfg)
    assert second == first.with_name(first.name + "-2")


def test_orphan_clean_up_spares_temp_files_of_live_processes(tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".last.ckpt.tmp-{sleeper.pid}-ab12"
        live.write_bytes(b"another process's save in progress")
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                                  text=True).stdout.strip()
        dead = tmp_path / f".best.ckpt.tmp-{dead_pid}-cd34"
        dead.write_bytes(b"left by a killed save")
        ck.atomic_torch_save({"w": torch.zeros(2)}, tmp_path / "last.ckpt")
        assert live.exists() and not dead.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def _write_run(root: Path, name: str, overrides, mtime: float) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config(["dataset=synthetic", *overrides])
    save_config(cfg, run / "config.yaml")
    last = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}, "global_step": 1, "hyper_parameters": {"config": {}}}, last)
    os.utime(last, (mtime, mtime))
    return last


def test_resume_auto_without_name_takes_the_newest_run_that_can_continue(tmp_path, capsys):
    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "resume=auto"])
    prefix = f"synthetic-dsrh-{cfg.model.bits}b-s0"
    same = _write_run(tmp_path, f"{prefix}-20260101-000000", [], 1000)
    _write_run(tmp_path, f"{prefix}-20260102-000000", ["model.backbone=resnet18"], 2000)  # newer, other backbone
    assert folders.resolve_run(cfg) == (same.parent.parent, same)
    assert "skipping" in capsys.readouterr().out


def test_resume_auto_names_the_skipped_run_and_its_key(tmp_path, capsys):
    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "resume=auto"])
    prefix = f"synthetic-dsrh-{cfg.model.bits}b-s0"
    _write_run(tmp_path, f"{prefix}-20260102-000000", ["model.backbone=resnet18"], 2000)
    run_dir, ckpt = folders.resolve_run(cfg)
    out = capsys.readouterr().out
    assert ckpt is None and run_dir.name.startswith(prefix) and run_dir.name != f"{prefix}-20260102-000000"
    assert f"skipping {prefix}-20260102-000000" in out and "model.backbone: checkpoint 'resnet18'" in out


def test_a_read_only_output_dir_fails_before_any_work(tmp_path, monkeypatch):
    real_mkdir = Path.mkdir

    def read_only(self, *a, **k):
        if str(self).startswith(str(tmp_path / "ro")):
            raise PermissionError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", read_only)
    built = []
    monkeypatch.setattr("dsrh_lightning.runs.train.HashingDataModule", lambda *a, **k: built.append(1))
    with pytest.raises(RunFolderError, match="cannot create or write the run folder.*output_dir=PATH"):
        train(load_config(["dataset=synthetic", f"output_dir={tmp_path / 'ro'}", "name=x", *TINY]))
    assert not built  # no data was loaded


def test_a_full_disk_during_a_checkpoint_save_keeps_the_previous_one(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    ck.atomic_torch_save({"global_step": 4}, last)

    def fills_the_disk(obj, f):
        f.write(b"PK\x03\x04 part")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", fills_the_disk)
    with pytest.raises(WriteError, match=rf"{last}: cannot write \(No space left on device\); the previous"):
        ck.atomic_torch_save({"global_step": 5}, last)
    monkeypatch.undo()
    assert torch.load(last, weights_only=True)["global_step"] == 4
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


_FSIZE = textwrap.dedent("""
    import resource, sys, torch
    from dsrh_lightning.lightning.callbacks.checkpoint import atomic_torch_save
    resource.setrlimit(resource.RLIMIT_FSIZE, (200 * 1024, resource.RLIM_INFINITY))
    atomic_torch_save({"w": torch.zeros(1_000_000)}, sys.argv[1])
""")


def test_a_file_size_limit_is_a_clear_error_from_the_cli_path(tmp_path):
    """The real torch.save under ``ulimit -f``: an OSError, then torch's own RuntimeError; one message."""
    last = tmp_path / "last.ckpt"
    torch.save({"global_step": 4}, last)
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-c", _FSIZE, str(last)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0 and "WriteError" in proc.stderr and "File too large" in proc.stderr, proc.stderr
    assert "enforce fail" not in proc.stderr.splitlines()[-1]
    assert torch.load(last, weights_only=True)["global_step"] == 4


def test_a_run_folder_deleted_mid_run_stops_with_an_error(tiny_overrides, tmp_path, monkeypatch):
    import shutil

    run_dir = tmp_path / "runs" / "gone"

    def delete_folder(self, outputs, batch, batch_idx):
        if self.global_step == 2 and run_dir.exists():
            shutil.rmtree(run_dir)

    monkeypatch.setattr(module_lib.HashingModule, "on_train_batch_end", delete_folder, raising=False)
    with pytest.raises(RunFolderError, match="config.yaml is gone: the run folder was deleted"):
        train(load_config(tiny_overrides + TINY + ["name=gone", "trainer.checkpoint_every_n_steps=3"]))


def test_a_second_signal_names_the_checkpoint_that_remains(tmp_path):
    cb = ck.LastCheckpoint(tmp_path / "run" / "checkpoints")
    cb._handler(signal.SIGINT, None)
    cb.saved_step = 8
    with pytest.raises(ck.TrainingInterrupted) as err:
        cb._handler(signal.SIGINT, None)
    assert err.value.code == 130
    msg = err.value.message
    assert "received again" in msg and f"{cb.path} holds step 8" in msg and "name=run resume=auto" in msg
    fresh = ck.LastCheckpoint(tmp_path / "other" / "checkpoints")
    fresh._handler(signal.SIGTERM, None)
    with pytest.raises(ck.TrainingInterrupted) as err:
        fresh._handler(signal.SIGTERM, None)
    assert err.value.code == 143 and "no checkpoint was written yet" in err.value.message


def test_resuming_with_another_thread_count_is_said_and_recorded(tiny_overrides, capsys, restore_threads):
    base = tiny_overrides + TINY + ["name=thr"]
    first = train(load_config(base + ["trainer.num_threads=1"]))
    capsys.readouterr()
    train(load_config(base + ["trainer.num_threads=2", "trainer.max_steps=6", "resume=auto"]))
    out = capsys.readouterr().out
    assert "NOTE: resuming step 4 with trainer.num_threads=2" in out and "ran with 1" in out
    text = (Path(first["run_dir"]) / "config.yaml").read_text()
    assert "# trainer.num_threads=1 ran steps 0-4" in text
    assert yaml.safe_load(text)["trainer"]["num_threads"] == 2


def test_resume_auto_restarts_a_run_killed_before_its_first_checkpoint(tmp_path):
    run_dir = tmp_path / "k"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("seed: 0\n")
    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=k", "resume=auto"])
    lock, created = folders.claim_run_folder(cfg, run_dir, None)  # nothing to lose: no checkpoint, no metrics
    lock.release()
    assert not created
    (run_dir / "metrics.json").write_text("{}")  # a finished run is never restarted silently
    with pytest.raises(RunFolderError, match="already holds a run"):
        folders.claim_run_folder(cfg, run_dir, None)


def test_resume_path_into_another_named_folder_that_holds_a_run_is_refused(tmp_path):
    other, target = tmp_path / "a", tmp_path / "b"
    for d in (other, target):
        (d / "checkpoints").mkdir(parents=True)
        (d / "config.yaml").write_text("seed: 0\n")
    ckpt = other / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"x")
    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=b", f"resume={ckpt}"])
    with pytest.raises(RunFolderError, match="already holds a run"):
        folders.claim_run_folder(cfg, target, ckpt)
    lock, _ = folders.claim_run_folder(cfg, other, ckpt)  # continuing in the checkpoint's own folder is fine
    lock.release()


def test_a_size_limit_during_training_is_one_error_line_from_dsrh_train(tmp_path):
    """``ulimit -f`` below a checkpoint's size: exit 2, ``error: <file>: cannot write (File too large)``, no
    traceback, no partial checkpoint (it was: an OSError, then torch's RuntimeError, exit 1)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, resource.RLIM_INFINITY))

    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    args = ["dataset=synthetic", f"output_dir={tmp_path}", "name=full", "data.synthetic_per_class=20",
            "data.protocol.query_per_class=2", "data.protocol.val_per_class=2", "data.batch_size=16",
            "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.checkpoint_every_n_steps=2", *TINY]
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "train", *args], capture_output=True,
                          text=True, env=env, timeout=600, preexec_fn=limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "checkpoints/last.ckpt: cannot write (File too large)" in proc.stderr.splitlines()[-1]
    assert not list((tmp_path / "full" / "checkpoints").glob("*.ckpt"))
    assert not list((tmp_path / "full" / "checkpoints").glob(".*tmp-*"))
