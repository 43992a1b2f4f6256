"""Compare finished runs (deep or baseline) from their saved results: one table and overlaid plots.

A run folder holds ``metrics.json`` (``test/map``, ``test/precision_radius``, ``test/ndcg`` for multilevel
evaluation), ``config.yaml`` and, since plots are written at test end, ``plots/curves.json`` (the
precision-recall curve and the tested checkpoint's step). Nothing is re-encoded.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ..errors import FileError, InputError
from ..files import write_text

__all__ = ["RunResult", "read_run", "format_table", "best_run", "map_series", "write_comparison", "log_to_wandb",
           "COLUMNS"]

# (header, attribute) of the printed table
COLUMNS = (("run", "name"), ("dataset", "dataset"), ("method", "method"), ("bits", "bits"), ("seed", "seed"),
           ("MAP", "map"), ("P@r<={radius}", "precision_radius"), ("NDCG", "ndcg"), ("best step", "step"))


@dataclass
class RunResult:
    """What one run folder says about its test evaluation."""

    path: str
    name: str
    dataset: str
    method: str
    bits: int
    seed: Optional[int]
    map: float
    precision_radius: Optional[float]
    radius: Optional[int]
    ndcg: Optional[float]
    step: Optional[int]
    pr_curve: Optional[Dict[str, List[float]]] = field(default=None, repr=False)


def _read_json(path: Path) -> dict:
    """The JSON object in ``path``; FileError naming the file when it is unreadable or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise FileError(path, f"not readable JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise FileError(path, f"expected a JSON object (key: value), found a {type(data).__name__}")
    return data


def _read_config(path: Path) -> dict:
    """The run's ``config.yaml`` as a dict; FileError naming the file when it is unreadable."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise FileError(path, f"not readable YAML ({type(exc).__name__}: {str(exc)[:300]})") from None
    if not isinstance(data, dict):
        raise FileError(path, f"expected a YAML mapping (the run's configuration), found a {type(data).__name__}")
    return data


def _step_from_name(checkpoint: Optional[str]) -> Optional[int]:
    m = re.search(r"step(\d+)", Path(checkpoint).name) if checkpoint else None
    return int(m.group(1)) if m else None


def read_run(run_dir) -> RunResult:
    """The test results of ``run_dir`` (a folder with ``metrics.json``); raises FileNotFoundError (no folder,
    no ``metrics.json``) or :class:`~dsrh_lightning.errors.FileError` (an unreadable or incomplete file)
    naming the file and what is missing: user errors, printed without a traceback."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run folder")
    mpath = run / "metrics.json"
    if not mpath.is_file():
        raise FileNotFoundError(f"{run}: no metrics.json (the run has not finished, or is not a run folder)")
    metrics = _read_json(mpath)
    if "test/map" not in metrics:
        raise FileError(mpath, "no test/map (run with trainer.test_after_fit=true, or dsrh eval the checkpoint)")
    curves = _read_json(run / "plots" / "curves.json") if (run / "plots" / "curves.json").is_file() else {}
    cfg: dict = _read_config(run / "config.yaml") if (run / "config.yaml").is_file() else {}

    def pick(curve_key: str, cfg_path: str):
        if curves.get(curve_key) is not None:
            return curves[curve_key]
        node = cfg
        for part in cfg_path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    try:
        return _result(run, metrics, curves, pick)
    except (TypeError, ValueError) as exc:  # e.g. "test/map": "high", "bits": [12]
        raise FileError(run, f"a value in metrics.json, plots/curves.json or config.yaml is not a number "
                             f"({type(exc).__name__}: {exc})") from None


def _result(run: Path, metrics: dict, curves: dict, pick) -> RunResult:
    step = curves.get("step") if curves.get("step") is not None else _step_from_name(metrics.get("best_checkpoint"))
    if step is None and metrics.get("global_step") is not None and not metrics.get("best_checkpoint"):
        step = int(metrics["global_step"])
    radius = pick("radius", "eval.radius")
    bits = pick("bits", "model.bits") or metrics.get("test/bits")
    return RunResult(path=str(run), name=run.name, dataset=str(pick("dataset", "data.dataset") or "?"),
                     method=str(pick("method", "experiment") or metrics.get("method") or "?"),
                     bits=int(bits) if bits is not None else 0, seed=pick("seed", "seed"),
                     map=float(metrics["test/map"]), precision_radius=metrics.get("test/precision_radius"),
                     radius=int(radius) if radius is not None else None, ndcg=metrics.get("test/ndcg"),
                     step=int(step) if step is not None else None, pr_curve=curves.get("pr_curve"))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "-" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def format_table(rows: Sequence[RunResult]) -> str:
    """A fixed-width text table, best MAP first; the NDCG column only when some run has NDCG. When the runs
    used one Hamming radius the precision column's header names it (``P@r<=2``); else the header is
    ``P@r<=r`` and, where the runs' radii differ, each cell names its run's radius (``0.4123(r=2)``, ``r=?``
    where a run does not say)."""
    radii = {r.radius for r in rows}
    one = len(radii) <= 1  # every run used the same radius (or none says which)
    radius = str(next(iter(radii))) if one and None not in radii and radii else "r"
    cols = [(h.format(radius=radius), a) for h, a in COLUMNS if a != "ndcg" or any(r.ndcg is not None for r in rows)]
    ordered = sorted(rows, key=lambda r: -r.map)

    def cell(r: RunResult, a: str) -> str:
        text = _cell(getattr(r, a))
        if a == "precision_radius" and not one and text != "-":
            text += f"(r={r.radius if r.radius is not None else '?'})"
        return text

    table = [[h for h, _ in cols]] + [[cell(r, a) for _, a in cols] for r in ordered]
    widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths)] + lines[1:])


def best_run(rows: Sequence[RunResult]) -> RunResult:
    """The run with the highest test MAP (the first listed among equals)."""
    if not rows:
        raise InputError("no runs to compare")
    return max(rows, key=lambda r: r.map)


def _label(r: RunResult) -> str:
    return f"{r.method} {r.bits}b s{r.seed if r.seed is not None else '?'} ({r.name})"


def map_series(rows: Sequence[RunResult]) -> Dict[str, Dict[int, List[float]]]:
    """The MAP-vs-bits lines: ``{label: {bits: [MAP of each run]}}``, one line per (data set, method), so
    runs on different data sets are never pooled; the label is the method, with `` on <dataset>`` when the
    runs span more than one data set."""
    several = len({r.dataset for r in rows}) > 1
    series: Dict[str, Dict[int, List[float]]] = {}
    for r in sorted(rows, key=lambda r: (r.dataset, r.method)):
        label = f"{r.method} on {r.dataset}" if several else r.method
        series.setdefault(label, {}).setdefault(r.bits, []).append(r.map)
    return series


def write_comparison(rows: Sequence[RunResult], out_dir, formats: Sequence[str] = ("png", "pdf")) -> Dict[str, Path]:
    """``comparison.json`` (the table), overlaid ``pr_curves`` (runs that saved curves.json) and
    ``map_vs_bits`` in each of ``formats`` under ``out_dir``; returns the written paths by name."""
    from ..plots.figures import plot_map_vs_bits, plot_pr_curves, save_figures

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted({r.dataset for r in rows})
    where = " / ".join(datasets) + " / test split"
    series = map_series(rows)
    written = {"table": out / "comparison.json"}
    write_text(written["table"], json.dumps([{k: v for k, v in asdict(r).items() if k != "pr_curve"}
                                             for r in sorted(rows, key=lambda r: -r.map)], indent=1))
    curves = {_label(r): r.pr_curve for r in rows if r.pr_curve}
    for fmt in formats:
        figs = {"map_vs_bits": plot_map_vs_bits(series, f"MAP vs code length\n{where}")}
        if curves:
            figs["pr_curves"] = plot_pr_curves(curves, f"Precision-recall (Hamming ranking)\n{where}")
        for name, path in save_figures(figs, out, fmt=fmt).items():
            written[f"{name}.{fmt}"] = path
    return written


def log_to_wandb(rows: Sequence[RunResult], images: Dict[str, Path], project: str, entity: str = "",
                 mode: str = ""):
    """One W&B run holding the comparison as a ``wandb.Table`` (and the PNG plots); returns the table."""
    import wandb

    cols = ["run", "dataset", "method", "bits", "seed", "map", "precision_radius", "ndcg", "best_step"]
    table = wandb.Table(columns=cols, data=[[r.name, r.dataset, r.method, r.bits, r.seed, r.map, r.precision_radius,
                                              r.ndcg, r.step] for r in sorted(rows, key=lambda r: -r.map)])
    run = wandb.init(project=project, entity=entity or None, mode=mode or None, job_type="compare",
                     name="compare-" + "-".join(sorted({r.method for r in rows}))[:60])
    try:
        run.log({"comparison": table, **{f"comparison/{k.split('.')[0]}": wandb.Image(str(p))
                                         for k, p in images.items() if k.endswith(".png")}})
    finally:
        run.finish()
    return table


def summarise_sweep(out_dir, records: Sequence[dict], metric: Optional[str], goal: str = "maximize",
                    stream=None) -> Optional[Path]:
    """The end of a sweep: name the best finished run by the sweep's own ``metric`` (chosen on validation, as
    the sweep chose), then print the comparison table of the finished runs and write its plots under
    ``out_dir/comparison``. Returns the best run's folder (None when no run finished with the metric)."""
    import sys

    stream = stream or sys.stdout
    out = Path(out_dir)
    done = [r for r in records if r.get("state") == "finished" and (out / r["name"] / "metrics.json").is_file()]
    scored = [r for r in done if metric and isinstance((r.get("summary") or {}).get(metric), (int, float))]
    best = None
    if scored:
        pick = max if goal != "minimize" else min
        rec = pick(scored, key=lambda r: r["summary"][metric])
        best = out / rec["name"]
        print(f"sweep best run by {metric} ({goal}): {best} ({metric}={rec['summary'][metric]:.4f})", file=stream)
    rows = []
    for r in done:
        try:
            rows.append(read_run(out / r["name"]))
        except (OSError, ValueError) as exc:  # e.g. a run without test metrics (trainer.test_after_fit=false)
            print(f"  (not in the table: {exc})", file=stream)
    if rows:
        print(format_table(rows), file=stream)
        write_comparison(rows, out / "comparison", ("png",))
        print(f"comparison plots in {out / 'comparison'}", file=stream)
    return best
