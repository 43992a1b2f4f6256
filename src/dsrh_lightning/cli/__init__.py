"""Command line: ``dsrh train | eval | eval-codes | index | search | config | sweep-local``.

Parses (:mod:`.parsers`), then calls the command (:mod:`.commands`), which imports the
heavy modules it needs. Errors the user can fix print ``error: ...`` and exit 2.
"""

from __future__ import annotations

import logging
import sys
from typing import List, Optional

from .parsers import build_parser

__all__ = ["main", "build_parser", "UserError"]


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


# (module, class) of errors the user can fix. Looked up only in modules already imported:
# an exception cannot be of a class whose module was never loaded, and the CLI stays light.
_USER_ERRORS = [
    ("dsrh_lightning.config", "ConfigError"),
    ("dsrh_lightning.data.sources", "DataNotFoundError"),
    ("dsrh_lightning.models.backbones", "WeightsUnavailableError"),
    ("dsrh_lightning.search.codes_file", "CodesFileError"),
    ("dsrh_lightning.search.images", "ImageInputError"),
    ("dsrh_lightning.runs.checkpoints", "CheckpointError"),
]


def _user_errors() -> tuple:
    found = [UserError, FileNotFoundError, ValueError, FloatingPointError]
    for mod, name in _USER_ERRORS:
        m = sys.modules.get(mod)
        if m is not None and hasattr(m, name):
            found.append(getattr(m, name))
    return tuple(found)


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
        if isinstance(exc, _user_errors()):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        raise
