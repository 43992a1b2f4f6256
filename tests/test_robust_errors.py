"""User errors print ``error: ...`` (exit 2); anything else is a bug and keeps its traceback."""

from __future__ import annotations

import ast
import errno
import importlib
from pathlib import Path

import pytest

from conftest import REPO
from dsrh_lightning import cli
from dsrh_lightning.cli import commands
from dsrh_lightning.errors import DsrhError, InputError

SRC = REPO / "src" / "dsrh_lightning"


def _error_classes():
    """(module, class name) of every class named ``*Error`` defined in the package."""
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        mod = ".".join(("dsrh_lightning",) + path.relative_to(SRC).with_suffix("").parts)
        mod = mod[: -len(".__init__")] if mod.endswith(".__init__") else mod
        for node in tree.body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                yield mod, node.name


def test_every_project_error_derives_from_the_one_base():
    found = list(_error_classes())
    assert len(found) >= 8, found  # the scan sees the package's error types
    listed = (SRC / "errors.py").read_text()
    for mod, name in found:
        cls = getattr(importlib.import_module(mod), name)
        assert issubclass(cls, DsrhError), f"{mod}.{name} does not derive from errors.DsrhError"
        assert name in listed, f"{mod}.{name} is not listed in errors.py's docstring"


def _run(monkeypatch, capsys, exc):
    def handler(args, unknown):
        raise exc

    monkeypatch.setitem(commands.HANDLERS, "config", handler)
    rc = cli.main(["config"])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("exc", [
    InputError("--k must be >= 1"),
    FileNotFoundError(errno.ENOENT, "No such file or directory", "x.npz"),
    PermissionError(errno.EACCES, "Permission denied", "/ro/out"),
    OSError(errno.ENOSPC, "No space left on device"),
])
def test_user_errors_print_one_line_and_exit_2(monkeypatch, capsys, exc):
    rc, err = _run(monkeypatch, capsys, exc)
    assert rc == 2 and err.startswith("error: ") and "Traceback" not in err


@pytest.mark.parametrize("exc", [ValueError("shape mismatch in a library function"), KeyError("k"),
                                 RuntimeError("bug"), FloatingPointError("overflow")])
def test_other_errors_keep_their_traceback(monkeypatch, capsys, exc):
    with pytest.raises(type(exc)):
        _run(monkeypatch, capsys, exc)
