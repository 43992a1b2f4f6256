"""Run a W&B sweep file without a W&B server: ``dsrh sweep-local SWEEP.yaml --count N [overrides]``.

The sweep engine W&B's own controller uses (``sweeps`` from ``wandb[sweeps]``)
proposes each run (grid, random or bayes); each run is ``dsrh train`` in a
subprocess with the command line the sweep file's ``command`` would give a W&B
agent, logged offline (``wandb sync`` uploads it later), and its metric is fed
back so Bayesian search can use it. The state is kept in
``<output-dir>/sweep_state.json``; running the command again continues the sweep.

Overrides given on the command line are added to every run after the swept
values (so they win), then ``output_dir`` and ``name`` are set per run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from ..config import ConfigError, default_config_dir
from ..files import write_text

__all__ = ["SweepError", "load_sweep", "resolve_sweep_path", "run_overrides", "run_sweep_local",
           "sample_values", "format_value", "run_folder_overrides", "state_path", "sweep_runs"]

# Macros of a W&B sweep ``command`` that carry no override.
_DROP = {"${env}", "${interpreter}", "${program}", "dsrh", "train"}


class SweepError(ConfigError):
    """A sweep file problem; the message names the file."""


def default_sweep_dir() -> Path:
    return default_config_dir().parent / "sweeps"


def resolve_sweep_path(name: str | Path) -> Path:
    """``name`` as a path, else ``experiments/sweeps/<name>`` (``.yaml`` optional)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (default_sweep_dir() / path.name, default_sweep_dir() / f"{path.name}.yaml"):
        if candidate.is_file():
            return candidate
    available = ", ".join(sorted(p.name for p in default_sweep_dir().glob("*.yaml")))
    raise SweepError(f"sweep file {name} not found (also looked in {default_sweep_dir()}: {available})")


def _sweeps():
    """W&B's sweep engine (``sweeps``), imported without the pydantic warnings its v1-style models raise
    under pydantic 2 (they concern its code, not the sweep; other warnings still show)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"Valid config keys have changed in V2", category=UserWarning)
        warnings.filterwarnings("ignore", message=r"Support for class-based `config` is deprecated")
        import sweeps
    return sweeps


def load_sweep(path: str | Path) -> Dict[str, Any]:
    """Load a sweep file and validate it against W&B's sweep schema."""
    schema_violations_from_proposed_config = _sweeps().schema_violations_from_proposed_config

    path = Path(path)
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise SweepError(f"{path}: cannot parse YAML: {exc}") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: a sweep file is a YAML mapping")
    violations = schema_violations_from_proposed_config(sweep)
    if violations:
        raise SweepError(f"{path}: not a valid W&B sweep: " + "; ".join(violations))
    return sweep


def format_value(value: Any) -> str:
    """A swept value as the command line carries it (``true``/``false``, ``[a,b]``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    return str(value)


def run_overrides(sweep: Dict[str, Any], params: Dict[str, Any]) -> List[str]:
    """The ``dsrh train`` overrides a W&B agent would pass for ``params`` (expanding ``command``)."""
    hyphens = [f"--{k}={format_value(v)}" for k, v in params.items()]
    plain = [f"{k}={format_value(v)}" for k, v in params.items()]
    command = sweep.get("command") or ["${env}", "${interpreter}", "${program}", "${args}"]
    out: List[str] = []
    for item in command:
        item = str(item)
        if item in ("${args}", "${args_no_boolean_flags}"):
            out.extend(hyphens)
        elif item == "${args_no_hyphens}":
            out.extend(plain)
        elif item == "${args_json}" or item == "${args_json_file}":
            raise SweepError("sweep-local supports ${args} and ${args_no_hyphens} in command, not JSON arguments")
        elif item in _DROP or item == sweep.get("program"):
            continue
        elif item.startswith("${"):
            raise SweepError(f"sweep-local does not know the command macro {item}")
        else:
            out.append(item)
    return out


def sample_values(spec: Dict[str, Any]) -> List[Any]:
    """Representative values of one parameter spec (all ``values``, the ``value``, or ``min`` and ``max``)."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    if "min" in spec and "max" in spec:
        return [spec["min"], spec["max"]]
    raise SweepError(f"parameter spec {spec} has no values, value or min/max")


def run_folder_overrides(out_dir: Path, name: str) -> List[str]:
    """A sweep run's own folder ``<out_dir>/<name>``, with ``resume=auto``: a run that a stopped sweep left half
    done continues from its last checkpoint (or starts afresh) instead of failing on its folder."""
    return [f"output_dir={out_dir}", f"name={name}", "resume=auto"]


def state_path(out_dir: Path) -> Path:
    """Where a sweep kept in ``out_dir`` records its runs."""
    return out_dir / "sweep_state.json"


def sweep_runs(out_dir: Path) -> List[Dict[str, Any]]:
    """The run records of the sweep kept in ``out_dir`` (oldest first; [] before its first run)."""
    path = state_path(out_dir)
    return json.loads(path.read_text())["runs"] if path.is_file() else []


def _load_state(out_dir: Path, sweep_file: Path, overrides: Sequence[str], seed: int) -> Dict[str, Any]:
    path = state_path(out_dir)
    if path.is_file():
        try:
            state = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise SweepError(f"{path}: not valid JSON ({exc}); move it away to start the sweep afresh") from None
        if state.get("sweep_file") != str(sweep_file):
            raise SweepError(f"{out_dir} holds a sweep of {state.get('sweep_file')}, not {sweep_file}; "
                             "use another --output-dir")
        _warn_changed(path, state, list(overrides), seed)
        return state
    return {"sweep_file": str(sweep_file), "overrides": list(overrides), "seed": seed, "runs": []}


def _warn_changed(path: Path, state: Dict[str, Any], overrides: List[str], seed: int) -> None:
    """Warn when a sweep is continued with other command-line overrides or seed than it started with."""
    before = state.setdefault("overrides", overrides)  # a state file from before they were recorded: from now on
    state.setdefault("seed", seed)
    if list(before) != overrides:
        removed = [a for a in before if a not in overrides]
        added = [a for a in overrides if a not in before]
        what = "; ".join(x for x in (f"dropped: {' '.join(removed)}" if removed else "",
                                     f"added: {' '.join(added)}" if added else "") if x) or "same items, other order"
        print(f"WARNING: sweep-local: continuing the sweep in {path.parent} with other arguments than it was "
              f"started with ({what}). Earlier runs used: {' '.join(before) or '(none)'}; the new runs use: "
              f"{' '.join(overrides) or '(none)'}. Their metrics are not comparable; use another --output-dir "
              f"for a new sweep.", file=sys.stderr, flush=True)
    if state["seed"] != seed:
        print(f"WARNING: sweep-local: {path} was started with --seed {state['seed']}, continuing with --seed {seed}",
              file=sys.stderr, flush=True)


def _metric_value(summary: Optional[Dict[str, Any]], metric: Optional[str]) -> Optional[float]:
    """The sweep metric of a run's metrics.json: ``best_val_map`` for ``val/map`` (checkpoint selection's
    value, the best validation, not the last), else the named key. None when absent or not finite."""
    if not summary or not metric:
        return None
    value = summary.get("best_val_map") if metric in ("val/map", "best_val_map") else None
    if value is None:
        value = summary.get(metric)
    if value is None or not isinstance(value, (int, float)) or value != value:
        return None
    return float(value)


def _sweep_run(record: Dict[str, Any]):
    RunState, SweepRun = _sweeps().RunState, _sweeps().SweepRun

    return SweepRun(name=record["name"], state=RunState(record["state"]), config=record["config"],
                    summary_metrics=record.get("summary") or {}, history=record.get("history") or [])


RunFn = Callable[[List[str], Path, str], Tuple[int, Optional[Dict[str, Any]]]]


def train_subprocess(overrides: List[str], out_dir: Path, name: str) -> Tuple[int, Optional[Dict[str, Any]]]:
    """Run ``dsrh train`` with ``overrides`` in a subprocess (W&B offline); its exit code and metrics.json."""
    env = dict(os.environ, WANDB_MODE="offline")
    cmd = [sys.executable, "-m", "dsrh_lightning.cli", "train", *overrides]
    log_path = out_dir / f"{name}.log"
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    metrics = out_dir / name / "metrics.json"
    return code, (json.loads(metrics.read_text()) if metrics.is_file() else None)


def run_sweep_local(sweep_file: str | Path, count: int = 0, overrides: Sequence[str] = (),
                    output_dir: Optional[str | Path] = None, seed: int = 0,
                    run_fn: RunFn = train_subprocess) -> List[Dict[str, Any]]:
    """Propose and run up to ``count`` runs (0 = until a grid is exhausted); returns this call's run records.

    Each record: ``name``, ``config`` (``{key: {"value": v}}``, as W&B stores it), ``overrides``,
    ``state`` (finished / failed), ``returncode``, ``summary`` (the run's metrics.json) and
    ``history`` (``[{metric: best value}]``, what the bayes engine reads).
    """
    next_run = _sweeps().next_run

    path = resolve_sweep_path(sweep_file)
    sweep = load_sweep(path)
    method = sweep["method"]
    if count <= 0 and method != "grid":
        raise SweepError(f"{path}: method {method} never runs out of proposals; give --count (COUNT=n)")
    metric = (sweep.get("metric") or {}).get("name")
    out_dir = Path(output_dir) if output_dir else Path("runs") / "sweeps" / path.stem
    out_dir.mkdir(parents=True, exist_ok=True)
    state = _load_state(out_dir, path.resolve(), overrides, seed)
    done: List[Dict[str, Any]] = []
    while count <= 0 or len(done) < count:
        index = len(state["runs"])
        # The engine draws from numpy's and Python's global generators: seed them for a reproducible sweep.
        np.random.seed((seed * 100003 + index) % (2 ** 32))
        random.seed(seed * 100003 + index)
        proposal = next_run(sweep, [_sweep_run(r) for r in state["runs"]])
        if proposal is None:
            print(f"sweep-local: {path.name}: all {index} grid points done", flush=True)
            break
        params = {k: v["value"] for k, v in proposal.config.items()}
        name = f"{path.stem}-{index:03d}"
        # A run a killed sweep left unfinished continues (same seed and index, same proposal).
        run_args = run_overrides(sweep, params) + list(overrides) + run_folder_overrides(out_dir, name)
        print(f"sweep-local: run {name}: " + " ".join(f"{k}={format_value(v)}" for k, v in params.items()), flush=True)
        started = time.time()
        code, summary = run_fn(run_args, out_dir, name)
        history = []
        value = _metric_value(summary, metric)
        if value is not None:
            history = [{metric: value}]
        if code != 0:
            error = f"exit code {code}"
        elif summary is None:
            error = f"no {out_dir / name / 'metrics.json'}"
        elif metric and value is None:
            error = f"no {metric} in {out_dir / name / 'metrics.json'} (the run never validated)"
        else:
            error = None
        # A run without its metric tells the search nothing: it counts as failed, in the state file too.
        record = {"name": name, "config": {k: {"value": v} for k, v in params.items()}, "overrides": run_args,
                  "state": "failed" if error else "finished", "returncode": code, "error": error,
                  "summary": summary, "history": history, "seconds": round(time.time() - started, 1)}
        state["runs"].append(record)
        write_text(state_path(out_dir), json.dumps(state, indent=2))
        shown = f"{metric}={history[0][metric]:.4f}" if history else f"FAILED ({error}; see {out_dir}/{name}.log)"
        print(f"sweep-local: run {name}: {shown} ({record['seconds']}s)", flush=True)
        done.append(record)
    if done:
        print(f"sweep-local: state in {state_path(out_dir)}; upload the offline W&B runs with "
              f"`wandb sync {out_dir}/*/wandb/offline-run-*`", flush=True)
        from .compare import summarise_sweep  # the best run by the sweep's metric, and the comparison table

        summarise_sweep(out_dir, state["runs"], metric, (sweep.get("metric") or {}).get("goal", "maximize"))
    return done
