"""Codes files refuse edited or inconsistent contents, and are written atomically."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import REPO
from dsrh_lightning.files import WriteError
from dsrh_lightning.search import CodesFileError, read_codes, write_codes
from dsrh_lightning.search.codes_file import packed_checksum


def _arrays(path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture
def twelve_bit_file(tmp_path):
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, (50, 12), dtype=np.uint8)
    path = tmp_path / "db.npz"
    write_codes(path, codes, [f"x#{i}" for i in range(50)], labels=rng.integers(0, 3, 50))
    return path, codes


def test_written_file_has_integer_bits_and_a_checksum_that_covers_them(twelve_bit_file):
    path, codes = twelve_bit_file
    a = _arrays(path)
    assert a["bits"].dtype.kind == "i" and int(a["bits"]) == 12
    assert str(a["checksum"]) == packed_checksum(np.packbits(codes, axis=1), 12)
    assert str(a["checksum"]) != packed_checksum(np.packbits(codes, axis=1), 9)
    np.testing.assert_array_equal(read_codes(path).unpacked(), codes)


@pytest.mark.parametrize("edit,message", [
    ({"bits": np.asarray(9)}, "padding after bit 9"),         # fits the same two bytes
    ({"bits": np.asarray(16)}, "checksum does not match"),    # fits too; no padding to check
    ({"bits": np.asarray(12.7)}, "must be one integer"),
    ({"bits": np.asarray(12.0)}, "must be one integer"),
    ({"bits": np.asarray("12")}, "must be one integer"),
    ({"bits": np.asarray([12])}, "must be one integer"),
    ({"bits": np.asarray(20)}, "does not hold 20 bits"),
])
def test_edited_bits_are_refused(twelve_bit_file, tmp_path, edit, message):
    path, _ = twelve_bit_file
    bad = tmp_path / "edited.npz"
    np.savez(bad, **{**_arrays(path), **edit})
    with pytest.raises(CodesFileError) as err:
        read_codes(bad)
    assert str(bad) in str(err.value) and message in str(err.value), str(err.value)


def test_edited_code_is_refused_by_the_checksum(twelve_bit_file, tmp_path):
    path, _ = twelve_bit_file
    a = _arrays(path)
    packed = a["packed"].copy()
    packed[7, 0] ^= 0b1000_0000  # a real bit, not padding
    bad = tmp_path / "flipped.npz"
    np.savez(bad, **{**a, "packed": packed})
    with pytest.raises(CodesFileError, match="checksum does not match"):
        read_codes(bad)


def test_file_without_checksum_is_read_but_padding_is_still_checked(twelve_bit_file, tmp_path):
    path, codes = twelve_bit_file
    a = {k: v for k, v in _arrays(path).items() if k != "checksum"}
    old = tmp_path / "old.npz"
    np.savez(old, **a)
    np.testing.assert_array_equal(read_codes(old).unpacked(), codes)
    np.savez(old, **{**a, "bits": np.asarray(9)})
    with pytest.raises(CodesFileError, match="padding"):
        read_codes(old)


def test_failed_write_half_way_leaves_old_file_and_no_temp(twelve_bit_file, monkeypatch):
    path, codes = twelve_bit_file
    before = path.read_bytes()
    real_write_array = np.lib.format.write_array
    written = []

    def write_then_fill_the_disk(fh, arr, **kw):
        if len(written) == 3:  # three arrays are in the new file when the disk fills up
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(arr.shape)
        real_write_array(fh, arr, **kw)

    monkeypatch.setattr(np.lib.format, "write_array", write_then_fill_the_disk)
    with pytest.raises(WriteError, match="No space left on device.*the previous version is kept"):
        write_codes(path, np.ones((500, 12), np.uint8), [f"y#{i}" for i in range(500)])
    monkeypatch.undo()
    assert len(written) == 3
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["db.npz"]
    np.testing.assert_array_equal(read_codes(path).unpacked(), codes)


def test_file_size_limit_during_write_keeps_the_old_file(twelve_bit_file):
    """A real file-size limit (``ulimit -f``): the kernel refuses the write part way through."""
    path, _ = twelve_bit_file
    before = path.read_bytes()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        import numpy as np
        sys.path.insert(0, {str(REPO / 'src')!r})
        from dsrh_lightning.search import write_codes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG as an OSError, not a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
        from dsrh_lightning.files import WriteError
        try:
            write_codes({str(path)!r}, np.ones((20_000, 48), np.uint8), [f"/images/{{i:08d}}.png" for i in range(20_000)])
        except WriteError as exc:
            print("failed:", exc)
            sys.exit(0)
        sys.exit("the write should have failed")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "File too large" in out.stdout, out.stdout + out.stderr
    assert out.stderr == "", out.stderr  # no "Exception ignored" from a half-written archive
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["db.npz"]
