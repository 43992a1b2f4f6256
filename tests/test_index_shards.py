"""`dsrh index` on Lightning's predict loop: shards + manifest, the same codes from 1 and 2 processes,
resumable after a crash, output checked before the work, list-data-set ids resolved against data.root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from conftest import REPO
from dsrh_lightning import cli
from dsrh_lightning.search import read_codes
from dsrh_lightning.search.shards import open_sharded

ENV = dict(os.environ, PYTHONPATH=str(REPO / "src"))


def _shard_arrays(folder: Path) -> dict:
    """Every array of every shard, and the manifest (npz files embed write times: compare contents)."""
    out = {"manifest": json.loads((folder / "manifest.json").read_text())}
    for p in sorted(folder.glob("shard-*.npz")):
        with np.load(p) as z:
            out[p.name] = {k: z[k] for k in z.files}
    return out


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    assert a["manifest"] == b["manifest"]
    for name in a:
        if name != "manifest":
            assert a[name].keys() == b[name].keys(), name
            for k in a[name]:
                np.testing.assert_array_equal(a[name][k], b[name][k], err_msg=f"{name}:{k}")


def _index_cmd(ckpt, out, *extra):
    return [sys.executable, "-m", "dsrh_lightning.cli", "index", "--ckpt", str(ckpt), "--out", str(out),
            "split=database", "--shard-size", "40", "--batch-size", "16", "--no-progress",
            "trainer.accelerator=cpu", "trainer.num_threads=1", *extra]


def test_two_processes_give_the_codes_and_ids_of_one(tiny_ckpt, tmp_path):
    ckpt, cfg = tiny_ckpt
    one, two = tmp_path / "one", tmp_path / "two"
    p1 = subprocess.run(_index_cmd(ckpt, one, "trainer.devices=1"), capture_output=True, text=True, env=ENV,
                        timeout=600, cwd=tmp_path)
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = subprocess.run(_index_cmd(ckpt, two, "trainer.devices=2", "trainer.strategy=ddp"), capture_output=True,
                        text=True, env=ENV, timeout=600, cwd=tmp_path)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert "Starting with 2 processes" in p2.stderr  # really two ranks (gloo)
    assert p2.stderr.count("wrote 270 codes") == 1  # rank 0 reports
    _assert_same(_shard_arrays(one), _shard_arrays(two))
    sharded = open_sharded(two)
    assert len(sharded) == 270 and [s.count for s in sharded.shards] == [40] * 6 + [30]
    # The sharded index holds what a single codes file of the same split holds.
    single = tmp_path / "db.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(single), "split=database", "--no-progress"]) == 0
    whole, joined = read_codes(single), sharded.load()
    np.testing.assert_array_equal(joined.packed, whole.packed)
    np.testing.assert_array_equal(joined.ids, whole.ids)
    np.testing.assert_array_equal(joined.labels, whole.labels)
    assert not any(p.name.startswith(".db.npz") for p in tmp_path.iterdir())  # the parts folder is gone


def test_a_crashed_run_continues_to_the_same_files(tiny_ckpt, tmp_path, monkeypatch, capsys):
    from dsrh_lightning.runs import index as index_mod

    ckpt, _ = tiny_ckpt
    argv = ["index", "--ckpt", str(ckpt), "--out", None, "split=database", "--shard-size", "40", "--batch-size", "16",
            "--no-progress"]
    straight = tmp_path / "straight"
    assert cli.main([str(straight) if a is None else a for a in argv]) == 0

    real_write = index_mod.write_shard
    calls = []

    def crash_after_three(folder, number, *args, **kwargs):
        if len(calls) == 3:
            raise RuntimeError("injected crash after 3 shards")  # as a kill between shards
        calls.append(number)
        return real_write(folder, number, *args, **kwargs)

    crashed = tmp_path / "crashed"
    monkeypatch.setattr(index_mod, "write_shard", crash_after_three)
    with pytest.raises(RuntimeError, match="injected crash"):
        cli.main([str(crashed) if a is None else a for a in argv])
    assert sorted(p.name for p in crashed.glob("shard-*.npz")) == ["shard-00000.npz", "shard-00001.npz",
                                                                    "shard-00002.npz"]
    assert not (crashed / "manifest.json").exists()

    rewritten = []

    def counting(folder, number, *args, **kwargs):
        rewritten.append(number)
        return real_write(folder, number, *args, **kwargs)

    monkeypatch.setattr(index_mod, "write_shard", counting)
    capsys.readouterr()
    with_bar = [a for a in argv if a != "--no-progress"]
    assert cli.main([str(crashed) if a is None else a for a in with_bar]) == 0
    err = capsys.readouterr().err
    assert "3 of 7 shards already written" in err
    assert "120/270" in err and "270/270" in err  # one bar for the whole collection, from the shards done
    assert rewritten == [3, 4, 5, 6]  # the finished shards are skipped
    _assert_same(_shard_arrays(straight), _shard_arrays(crashed))
    # Once complete, the same command writes nothing.
    rewritten.clear()
    assert cli.main([str(crashed) if a is None else a for a in argv]) == 0
    assert rewritten == []


def test_ctrl_c_keeps_the_written_shards_and_says_how_to_continue(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import signal

    from dsrh_lightning.runs import index as index_mod

    ckpt, _ = tiny_ckpt
    out = tmp_path / "idx"
    argv = ["index", "--ckpt", str(ckpt), "--out", str(out), "split=database", "--shard-size", "40", "--no-progress"]
    real_write = index_mod.write_shard
    calls = []

    def ctrl_c_after_two(folder, number, *args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(number)
        return real_write(folder, number, *args, **kwargs)

    monkeypatch.setattr(index_mod, "write_shard", ctrl_c_after_two)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit) as stop:
            cli.main(argv)
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert f"stopped (Ctrl-C): 2 of 7 shards are written in {out}; run the same command again" in err
    monkeypatch.setattr(index_mod, "write_shard", real_write)
    assert cli.main(argv) == 0 and len(open_sharded(out)) == 270


def test_output_is_checked_before_any_work(tiny_ckpt, tmp_path, capsys, monkeypatch):
    from dsrh_lightning.runs import checkpoints

    ckpt, _ = tiny_ckpt

    def never(*a, **k):
        raise AssertionError("the checkpoint was opened before the output was checked")

    monkeypatch.setattr(checkpoints, "load_run", never)
    (tmp_path / "folder.npz").mkdir()
    (tmp_path / "a_file").write_text("x")
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    cases = [(tmp_path / "folder.npz", "is a folder"), (tmp_path / "a_file", "is a file")]
    if os.geteuid() != 0:  # root writes anywhere
        cases.append((locked / "db", "cannot write there"))
    for out, needle in cases:
        rc = cli.main(["index", "--ckpt", str(ckpt), "--out", str(out), "split=database", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and needle in err and str(out) in err and "Traceback" not in err, err
    locked.chmod(0o700)


def test_a_folder_of_another_index_is_refused(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    ckpt, _ = tiny_ckpt
    out = tmp_path / "idx"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(out), "split=query", "--no-progress"]) == 0
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "x.png")
    for argv, needle in [(["split=database"], "source: 'split=query of synthetic' there"),
                         (["split=query", "--shard-size", "7"], "shard_size: 100000 there, 7 now"),
                         ([str(tmp_path / "x.png")], "count: 30 there, 1 now")]:
        rc = cli.main(["index", "--ckpt", str(ckpt), "--out", str(out), "--no-progress", *argv])
        err = capsys.readouterr().err
        assert rc == 2 and "holds another index" in err and needle in err, err
    assert len(open_sharded(out)) == 30  # untouched


def test_list_data_set_ids_are_resolved_against_data_root(tiny_ckpt, tmp_path):
    """Issue 22 item 8: `dsrh index split=database` of a list data set, run from another folder, stores the
    images' real paths (under data.root), not paths relative to the current folder."""
    from dsrh_lightning.data.synthetic_folder import write_synthetic_list_dataset

    ckpt, _ = tiny_ckpt
    root = tmp_path / "data"
    write_synthetic_list_dataset(root, num_labels=3, n=60, query=10, train=30, multilabel=False)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    data = ["data.dataset=custom", f"data.root={root}", "data.train_list=train.txt", "data.query_list=test.txt",
            "data.database_list=database.txt", "data.protocol.val_per_class=1", "data.protocol.val_database_size=0",
            "data.image_size=32", f"data.split_dir={tmp_path / 'splits'}"]
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "index", "--ckpt", str(ckpt), "--out", "db.npz",
                           "split=database", "--no-progress", *data], capture_output=True, text=True, env=ENV,
                          timeout=600, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ids = read_codes(elsewhere / "db.npz").ids
    assert len(ids) == 50 and all(Path(i).is_absolute() and Path(i).is_file() for i in ids)
    assert all(Path(i).is_relative_to(root.resolve()) for i in ids)


def test_a_failed_write_keeps_the_existing_codes_file(tiny_ckpt, tmp_path, capsys):
    """Issue 22 item 2: `dsrh index --out keep.npz` again under a file-size limit below the file's size: the
    write fails part-way, the command exits 2 with the reason, and the earlier keep.npz is intact."""
    ckpt, _ = tiny_ckpt
    keep = tmp_path / "keep.npz"
    argv = ["index", "--ckpt", str(ckpt), "--out", str(keep), "split=database", "--shard-size", "40", "--no-progress"]
    assert cli.main(argv) == 0
    before = keep.read_bytes()
    limit = len(before) // 2
    code = (f"import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
            f"from dsrh_lightning.cli import main; sys.exit(main({argv!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert keep.read_bytes() == before
