"""Atomic file writes: a file the project writes is either its old version or the complete new one.

Every writer goes through :func:`atomic_write`: the data goes to a temporary file beside the target
(same folder, so the rename stays on one file system), is flushed and fsync'ed, then renamed over the
target with ``os.replace``; a write that fails (disk full, a file-size limit, Ctrl-C) removes the
temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Union

__all__ = ["TMP_MARK", "atomic_write", "write_bytes", "write_text", "save_npz", "tmp_path_for"]

#: Marks temporary files (``.<name>.tmp-<pid>-<random>``) so they can be recognised and cleaned up.
TMP_MARK = ".tmp-"

PathLike = Union[str, os.PathLike]


def tmp_path_for(path: PathLike) -> Path:
    """A fresh temporary path beside ``path``, unique to this process and call."""
    p = Path(path)
    return p.with_name(f".{p.name}{TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: PathLike, mode: str = "wb", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path`` for writing; on a clean exit it replaces ``path``.

    ``mode`` is ``"wb"`` or ``"w"`` (text, ``encoding``). The parent folder must exist (a missing one is
    an error naming it, not a silent ``mkdir`` in a mistyped place). If the block raises, the temporary
    file is removed and ``path`` is untouched.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_write: mode must be 'wb' or 'w', not {mode!r}")
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{target}: is a folder; give a file path")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"{target.parent}: folder does not exist (needed to write {target.name})")
    tmp = tmp_path_for(target)
    f = open(tmp, mode, encoding=None if "b" in mode else encoding)
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(target.parent)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as f:
        f.write(data)


def write_text(path: PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_write(path, "w", encoding=encoding) as f:
        f.write(text)


def save_npz(path: PathLike, compressed: bool = False, **arrays) -> None:
    """``numpy.savez`` (or ``savez_compressed``) to ``path`` atomically; ``path`` is used as given (no
    ``.npz`` is appended)."""
    import numpy as np

    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    write_bytes(path, buf.getvalue())
