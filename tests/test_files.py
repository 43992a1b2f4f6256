"""Atomic writes: a failed write leaves the old file intact and no temporary file behind."""

from __future__ import annotations

import numpy as np
import pytest

from dsrh_lightning import files


def test_write_replaces_whole_file(tmp_path):
    p = tmp_path / "a.json"
    files.write_text(p, "old")
    files.write_text(p, "new")
    assert p.read_text() == "new"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.json"]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    p = tmp_path / "keep.npz"
    files.save_npz(p, codes=np.arange(4))
    with pytest.raises(RuntimeError):
        with files.atomic_write(p) as f:
            f.write(b"partial")
            raise RuntimeError("disk full")
    assert np.load(p)["codes"].tolist() == [0, 1, 2, 3]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["keep.npz"]


def test_bad_targets_are_named(tmp_path):
    with pytest.raises(IsADirectoryError, match=str(tmp_path)):
        files.write_text(tmp_path, "x")
    with pytest.raises(FileNotFoundError, match="missing"):
        files.write_text(tmp_path / "missing" / "x.txt", "x")
    with pytest.raises(ValueError, match="mode"):
        with files.atomic_write(tmp_path / "x", "a"):
            pass


def test_check_writable_names_the_problem_before_any_work(tmp_path, monkeypatch):
    import errno

    with pytest.raises(files.WriteError, match="is a folder"):
        files.check_writable(tmp_path)
    with pytest.raises(files.WriteError, match="does not exist"):
        files.check_writable(tmp_path / "missing" / "out.npz")
    files.check_writable(tmp_path / "ok.npz")
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind
    real_open = open

    def read_only(path, *a, **k):
        if files.TMP_MARK in str(path):
            raise PermissionError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(files.WriteError, match=r"cannot write the output in .*\(Read-only file system\)"):
        files.check_writable(tmp_path / "ro.npz")
    with pytest.raises(files.WriteError, match=r"ro.npz: cannot write \(Read-only file system\)"):
        files.write_text(tmp_path / "ro.npz", "x")


def test_output_os_error_finds_the_cause_behind_torchs_error():
    import errno

    try:
        try:
            raise OSError(errno.EFBIG, "File too large")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")
    except RuntimeError as exc:
        found = files.output_os_error(exc)
    assert found is not None and found.errno == errno.EFBIG
    assert files.output_os_error(RuntimeError("a bug")) is None
    assert files.output_os_error(OSError(errno.EBADF, "Bad file descriptor")) is None
