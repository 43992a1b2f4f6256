"""Command line: ``dsrh train | eval | eval-codes | index | search | config | sweep-local``.

Parses (:mod:`.parsers`), then calls the command (:mod:`.commands`), which imports the
heavy modules it needs. Errors the user can fix (:class:`~dsrh_lightning.errors.DsrhError`, and
file-system errors about a path) print ``error: ...`` and exit 2; anything else is a bug and shows
its traceback.
"""

from __future__ import annotations

import errno
import logging
import sys
from typing import List, Optional

from ..errors import DsrhError
from .parsers import build_parser

__all__ = ["main", "build_parser", "is_user_error"]


# OS errors about a file or folder the user named (a missing input, a read-only or full output folder):
# printed like the project's own errors. Any other exception is a bug and keeps its traceback.
_USER_OS_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)
_USER_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EROFS, errno.EDQUOT)


def is_user_error(exc: BaseException) -> bool:
    """True for errors the user can fix: :class:`~dsrh_lightning.errors.DsrhError` and file-system
    errors naming a path (missing, read-only, disk full); False for everything else."""
    if isinstance(exc, DsrhError) or isinstance(exc, _USER_OS_ERRORS):
        return True
    return isinstance(exc, OSError) and exc.errno in _USER_ERRNOS


def main(argv: Optional[List[str]] = None) -> int:
    from . import commands

    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "eval-codes" and unknown:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    handler = commands.HANDLERS[args.command]
    try:
        return handler(args, unknown)
    except Exception as exc:
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
