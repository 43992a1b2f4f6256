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
