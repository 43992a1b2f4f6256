"""Import structure: no import cycles inside src/dsrh_lightning, and a light command line.

The cycle check parses every module with ast and follows BOTH module-level and
function-level (lazy) imports of dsrh_lightning modules, so a cycle hidden behind a
function-level import fails too. ``from . import x`` counts as importing ``pkg.x``
when ``x`` is a submodule; importing ``pkg.sub.mod`` also counts as importing the
packages ``pkg.sub`` (their ``__init__`` runs first).
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

from conftest import REPO

SRC = REPO / "src"
PKG = "dsrh_lightning"


def _modules() -> dict:
    mods = {}
    for path in (SRC / PKG).rglob("*.py"):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _edges(name: str, path, mods: dict) -> set:
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rsplit(".", 1)[0]
    out = set()

    def add(target: str) -> None:
        # the module itself, or its closest existing parent (a name imported from a module)
        while target and target not in mods:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
            out.add(target)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith(PKG):
                    add(a.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith(PKG):
                continue
            for a in node.names:
                full = f"{mod}.{a.name}"
                add(full if full in mods else mod)
    return out


def _cycles(graph: dict) -> list:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def _graph() -> dict:
    mods = _modules()
    # a package's __init__ is not an edge source for its own submodules' cycles through the parent package
    # (importing a.b.c runs a/__init__ first, but that is not a cycle unless a/__init__ imports back).
    return {name: _edges(name, path, mods) for name, path in mods.items()}


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_package():
    graph = _graph()
    assert "dsrh_lightning.search.engines" in graph["dsrh_lightning.plots.figures"]  # the parser sees real edges
    assert _cycles(graph) == [], "import cycles (module-level and function-level imports)"


def test_no_import_cycles_in_benchmarks():
    bench = REPO / "benchmarks"
    names = {p.stem for p in bench.glob("*.py")}
    graph = {}
    for p in bench.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in names:
                deps.add(node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in names}
        graph[p.stem] = deps
    assert _cycles(graph) == []


def _modules_after(code: str) -> set:
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sorted(sys.modules)))"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return set(proc.stdout.split())


HEAVY = ("torch", "pytorch_lightning", "lightning", "numba", "wandb", "matplotlib")


def test_cli_and_config_do_not_import_heavy_modules():
    for code in ("import dsrh_lightning.cli", "import dsrh_lightning.config",
                 "from dsrh_lightning.cli import build_parser; build_parser()",
                 "import dsrh_lightning.search"):
        loaded = _modules_after(code)
        heavy = [m for m in HEAVY if m in loaded]
        assert heavy == [], (code, heavy)


def test_help_and_config_error_do_not_import_torch():
    env = dict(os.environ, PYTHONPATH=str(SRC))
    probe = ("import sys, runpy\nsys.argv = ['dsrh'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('dsrh_lightning.cli', run_name='__main__')\n"
             "except SystemExit as e:\n    code = e.code\n"
             "print('HEAVY', [m for m in %r if m in sys.modules]); print('CODE', code)" % (HEAVY,))
    for argv, code in ((["--help"], 0), (["train", "--help"], 0), (["config", "modle.bits=3"], 2)):
        proc = subprocess.run([sys.executable, "-c", probe, *argv], capture_output=True, text=True, env=env,
                              timeout=120)
        assert "HEAVY []" in proc.stdout, (argv, proc.stdout[-500:], proc.stderr[-1000:])
        assert f"CODE {code}" in proc.stdout, (argv, proc.stdout[-500:], proc.stderr[-1000:])
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "config", "modle.bits=3"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and "modle" in proc.stderr and "Traceback" not in proc.stderr


# The floors of the package (docs: ARCHITECTURE.md, README "Layout"): a module never imports one on a higher floor.
# The loss registry is a torch-free name table the config validates ``loss.ranking`` against, so it sits with
# the primitives. The root package (``dsrh_lightning``, its ``__init__``) is matched exactly; every other entry is a
# module or package prefix, so a new top-level module or package is on no floor until it is listed here.
ROOT = "dsrh_lightning"
FLOORS = (
    ("primitives", (ROOT, "dsrh_lightning.config", "dsrh_lightning.errors", "dsrh_lightning.files",
                    "dsrh_lightning.relevance", "dsrh_lightning.seeding", "dsrh_lightning.losses.registry")),
    ("library", ("dsrh_lightning.data", "dsrh_lightning.models", "dsrh_lightning.losses", "dsrh_lightning.metrics",
                 "dsrh_lightning.baselines", "dsrh_lightning.search", "dsrh_lightning.plots")),
    ("lightning", ("dsrh_lightning.lightning",)),
    ("runs", ("dsrh_lightning.runs", "dsrh_lightning.serve")),
    ("cli", ("dsrh_lightning.cli",)),
)


def _floor(module: str) -> int:
    """The floor of ``module``: the root package exactly, else the longest prefix listed in :data:`FLOORS`."""
    best, level = -1, None
    for i, (_, prefixes) in enumerate(FLOORS):
        for p in prefixes:
            covers = module == p if p == ROOT else (module == p or module.startswith(p + "."))
            if covers and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is on no floor: add its package to FLOORS"
    return level


def test_floor_finder():
    assert _floor("dsrh_lightning.config") == 0
    assert _floor("dsrh_lightning.losses.registry") == 0 and _floor("dsrh_lightning.losses.triplet") == 1
    assert _floor("dsrh_lightning.lightning.callbacks.retrieval") == 2
    assert _floor("dsrh_lightning.runs.train") == 3 and _floor("dsrh_lightning.cli.commands") == 4
    assert _floor(ROOT) == 0 and _floor("dsrh_lightning.files") == 0
    for unlisted in ("dsrh_lightning.newpkg", "dsrh_lightning.newpkg.mod", "dsrh_lightning.configs"):
        with pytest.raises(AssertionError, match="is on no floor"):
            _floor(unlisted)


def test_every_module_is_on_a_floor():
    missing = []
    for module in _modules():
        try:
            _floor(module)
        except AssertionError:
            missing.append(module)
    assert missing == [], f"modules on no floor (add their package to FLOORS): {missing}"


def test_no_module_imports_a_higher_floor():
    graph = _graph()
    upward = sorted(f"{a} ({FLOORS[_floor(a)][0]}) imports {b} ({FLOORS[_floor(b)][0]})"
                    for a, deps in graph.items() for b in deps if _floor(b) > _floor(a))
    assert upward == []


def test_top_level_stays_small():
    top = sorted(p.name for p in (SRC / PKG).glob("*.py"))
    assert len(top) <= 8, top
