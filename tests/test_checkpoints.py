"""Checkpoint files you can trust: atomic saves, one last.ckpt, fallback from an unreadable last.ckpt,
resume compatibility checked before anything is written, no run folder from a failed start."""

import types
from pathlib import Path

import pytest
import torch

from dsrh_lightning.lightning.callbacks import checkpoint as ck
from dsrh_lightning.config import ConfigError, load_config, to_dict
from dsrh_lightning.runs.checkpoints import read_checkpoint
from dsrh_lightning.runs.checkpoints import open_resume
from dsrh_lightning.runs.folders import resolve_run
from dsrh_lightning.runs.train import train


def _ckpt(step, config=None):
    return {"state_dict": {"w": torch.full((3,), float(step))}, "global_step": step,
            "hyper_parameters": {"config": config or {}}}


def test_kill_during_save_keeps_previous_file_and_next_save_cleans_up(tmp_path, monkeypatch):
    last = tmp_path / "checkpoints" / "last.ckpt"
    ck.atomic_torch_save(_ckpt(4), last)
    real_save = torch.save

    def dies_half_way(obj, f):
        f.write(b"PK\x03\x04 partial checkpoint bytes")
        raise KeyboardInterrupt  # the process is interrupted in the middle of writing

    monkeypatch.setattr(ck.torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_torch_save(_ckpt(5), last)
    monkeypatch.setattr(ck.torch, "save", real_save)
    assert read_checkpoint(last)["global_step"] == 4  # the previous state, intact
    # A SIGKILL gives no chance to clean up: its temp file (beside the target) stays until the next save.
    orphan = last.with_name(".last.ckpt.tmp-99999-1")
    orphan.write_bytes(b"PK partial")
    ck.atomic_torch_save(_ckpt(6), last)
    assert read_checkpoint(last)["global_step"] == 6
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


def test_lightning_saves_go_through_the_atomic_writer(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(ck, "atomic_torch_save", lambda obj, path: calls.append(Path(path)))
    ck.AtomicCheckpointIO().save_checkpoint(_ckpt(1), tmp_path / "x.ckpt")
    assert calls == [tmp_path / "x.ckpt"]


def test_unreadable_last_ckpt_falls_back_to_newest_readable(tmp_path, capsys):
    base = ["dataset=synthetic", f"output_dir={tmp_path}", "name=a", "resume=auto"]
    folder = tmp_path / "a" / "checkpoints"
    folder.mkdir(parents=True)
    old = folder / "best-step3.ckpt"
    torch.save(_ckpt(3), old)
    torch.save(_ckpt(1), folder / "older.ckpt")
    import os
    os.utime(folder / "older.ckpt", (1, 1))
    last = folder / "last.ckpt"
    torch.save(_ckpt(5), last)
    last.write_bytes(last.read_bytes()[:100])  # truncated by a kill
    cfg = load_config(base)
    assert resolve_run(cfg) == (tmp_path / "a", last)  # resolve_run reads nothing
    used, ckpt = open_resume(cfg, last)
    assert used == old and ckpt["global_step"] == 3
    out = capsys.readouterr().out
    assert "last.ckpt" in out and str(old) in out and "WARNING" in out
    # An explicit path does not fall back: the error names it.
    with pytest.raises(ConfigError, match="resume=.*last.ckpt"):
        open_resume(load_config(base[:-1] + [f"resume={last}"]), last)
    old.write_text("not a checkpoint")
    (folder / "older.ckpt").unlink()
    with pytest.raises(ConfigError, match="no other readable checkpoint"):
        open_resume(cfg, last)


def test_resume_reads_the_checkpoint_once_before_lightning(tiny_overrides, monkeypatch):
    """resume=auto: dsrh reads last.ckpt once (fallback + compatibility check), then Lightning loads it."""
    import dsrh_lightning.runs.checkpoints as checkpoints_mod

    base = tiny_overrides + ["name=r", "trainer.max_steps=3"]
    train(load_config(base))
    reads = []

    def counting_read(path, *args, **kwargs):
        reads.append(Path(path).name)
        return read_checkpoint(path, *args, **kwargs)

    monkeypatch.setattr(checkpoints_mod, "read_checkpoint", counting_read)
    out = train(load_config(base[:-1] + ["trainer.max_steps=6", "resume=auto"]))
    assert reads == ["last.ckpt"] and out["global_step"] == 6


def test_changed_bits_on_resume_names_keys_and_touches_nothing(tmp_path):
    base = ["dataset=synthetic", f"output_dir={tmp_path}", "name=a", "logger.name=none"]
    run = tmp_path / "a"
    (run / "checkpoints").mkdir(parents=True)
    cfg = load_config(base)
    torch.save(_ckpt(7, to_dict(cfg)), run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text("original\n")
    bits = cfg.model.bits + 8
    with pytest.raises(ConfigError) as err:
        train(load_config(base + ["resume=auto", f"model.bits={bits}", "loss.ranking=dpsh"]))
    msg = str(err.value)
    assert "model.bits" in msg and str(bits) in msg and "loss.ranking" in msg and "last.ckpt" in msg
    assert (run / "config.yaml").read_text() == "original\n"
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "config.yaml", "last.ckpt"]


def test_malicious_resume_checkpoint_runs_nothing(tmp_path):
    flag = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {flag}",))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Evil()}, path)
    with pytest.raises(ConfigError, match="evil.ckpt"):
        train(load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=e", f"resume={path}"]))
    assert not flag.exists()


def test_failed_start_leaves_no_run_folder(tmp_path):
    cfg = load_config(["dataset=custom", f"data.root={tmp_path}", "data.list_file=missing.txt",
                       f"output_dir={tmp_path / 'runs'}", "name=bad", "logger.name=none"])
    with pytest.raises(Exception):
        train(cfg)
    assert not (tmp_path / "runs" / "bad").exists()


def test_last_checkpoint_every_minutes_and_steps(tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(ck.time, "monotonic", lambda: clock[0])
    saved = []
    trainer = types.SimpleNamespace(global_step=0, world_size=1, lightning_module=torch.nn.Linear(1, 1),
                                    save_checkpoint=lambda p, weights_only=None: saved.append(trainer.global_step),
                                    max_steps=13, max_epochs=-1, current_epoch=0, num_training_batches=100)
    cb = ck.LastCheckpoint(tmp_path, every_n_steps=10, every_minutes=2)
    cb._last_time = 0.0
    for step, t in [(1, 30), (2, 119), (3, 120), (4, 200), (10, 201), (11, 330), (12, 331), (13, 332)]:
        trainer.global_step, clock[0] = step, float(t)
        cb.on_train_batch_end(trainer, None, None, None, step - 1)
    # 2 min after start, step 10, 2 min after the step-10 save, and the last step (max_steps)
    assert saved == [3, 10, 11, 13]


def test_resume_from_a_checkpoint_written_before_newer_keys(tmp_path):
    """A key the checkpoint's version lacked (model.shared_dim, data.feature_norm) counts as its default:
    such a run resumes with today's defaults, and a non-default value is still refused by name."""
    from dsrh_lightning.runs.checkpoints import check_resume_compatible

    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=a", "resume=auto"])
    stored = to_dict(cfg)
    del stored["model"]["shared_dim"], stored["data"]["feature_norm"]
    ckpt = _ckpt(3, stored)
    check_resume_compatible(cfg, tmp_path / "last.ckpt", ckpt)  # no error
    wider = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=a", "resume=auto",
                         "model.shared_dim=512"])
    with pytest.raises(ConfigError, match=r"model.shared_dim: checkpoint 0, now 512"):
        check_resume_compatible(wider, tmp_path / "last.ckpt", ckpt)


def test_resume_with_sampling_auto_matches_what_auto_chose(tmp_path):
    """data.sampling=auto resumes a checkpoint whose run resolved it to balanced or random (the labels are the
    same), but not one trained on explicit triplets."""
    from dsrh_lightning.runs.checkpoints import check_resume_compatible

    cfg = load_config(["dataset=synthetic", "experiment=dsrh", f"output_dir={tmp_path}", "name=a", "resume=auto"])
    assert cfg.data.sampling == "auto"
    for chosen in ("balanced", "random"):
        stored = to_dict(cfg)
        stored["data"]["sampling"] = chosen
        check_resume_compatible(cfg, tmp_path / "last.ckpt", _ckpt(3, stored))  # no error
    stored["data"]["sampling"] = "triplets"
    with pytest.raises(ConfigError, match=r"data.sampling: checkpoint 'triplets', now 'auto'"):
        check_resume_compatible(cfg, tmp_path / "last.ckpt", _ckpt(3, stored))
