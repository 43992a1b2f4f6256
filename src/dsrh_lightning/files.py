"""Atomic file writes: a file the project writes is either its old version or the complete new one.

Every writer goes through :func:`atomic_write`: the data goes to a temporary file beside the target
(same folder, so the rename stays on one file system), is flushed and fsync'ed, then renamed over the
target with ``os.replace``; a write that fails (disk full, a file-size limit, Ctrl-C) removes the
temporary file and leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import secrets
from pathlib import Path
from typing import IO, Iterator, Optional, Union

from .errors import FileError

__all__ = ["TMP_MARK", "WriteError", "atomic_write", "check_writable", "output_os_error", "write_bytes",
           "write_text", "save_npz", "tmp_path_for", "tmp_owner_alive"]

#: Marks temporary files (``.<name>.tmp-<pid>-<random>``) so they can be recognised and cleaned up.
TMP_MARK = ".tmp-"

PathLike = Union[str, os.PathLike]


class WriteError(FileError):
    """A file cannot be written (disk full, a file-size limit, read-only or not permitted); the previous
    version of the file, if any, is kept."""


# Errors that say where the output goes cannot take it; anything else from a write is a bug.
_OUTPUT_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


def output_os_error(exc: BaseException) -> Optional[OSError]:
    """The ``OSError`` behind a failed write (``exc`` itself or what it was raised while handling, e.g. the
    ``RuntimeError`` torch.save raises after an ``OSError``), when it is about the output place; else None."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, OSError) and exc.errno in _OUTPUT_ERRNOS:
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def check_writable(path: PathLike, what: str = "output") -> None:
    """Raise :class:`WriteError` now, before any work, when ``path`` cannot be written: it is a folder,
    its folder is missing or not a folder, or a file cannot be created there."""
    target = Path(path)
    if target.is_dir():
        raise WriteError(target, f"is a folder; give a file path for the {what}")
    if not target.parent.is_dir():
        raise WriteError(target, f"folder {target.parent} does not exist (create it first)")
    if target.exists() and not os.access(target, os.W_OK):
        raise WriteError(target, f"the {what} file is not writable")
    probe = tmp_path_for(target)
    try:
        with open(probe, "wb"):
            pass
    except OSError as exc:
        raise WriteError(target, f"cannot write the {what} in {target.parent} ({exc.strerror})") from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def tmp_owner_alive(tmp: Path) -> bool:
    """Whether the process that made temporary file ``tmp`` (``.<name>.tmp-<pid>-...``) still runs.
    Unknown names count as alive (never delete what is not understood)."""
    try:
        pid = int(tmp.name.split(TMP_MARK, 1)[1].split("-", 1)[0])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


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
    try:
        f = open(tmp, mode, encoding=None if "b" in mode else encoding)
    except OSError as exc:
        if output_os_error(exc) is None:
            raise
        raise WriteError(target, f"cannot write ({exc.strerror})") from None
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        cause = output_os_error(exc)
        if cause is None:
            raise
        kept = "the previous version is kept" if target.exists() else "nothing was written"
        raise WriteError(target, f"cannot write ({cause.strerror}); {kept}") from None
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
