"""Classical hashing baselines (LSH, PCAH, ITQ, SH) as runs: fit on the training split's cached backbone
features, encode the test queries and the database, and write the same result files as a deep run.

The features are those of ``data.cache_features`` (extracted once, then read from ``data.feature_dir``), so
a baseline started from a deep run's folder (``--run``) sees exactly the features that run's heads trained
on. The run folder ``<output_dir>/<name>/`` gets ``config.yaml`` (``experiment`` = the baseline's name),
``metrics.json`` (``test/...`` keys like a deep run) and ``plots/`` (figures and ``curves.json``), which
``dsrh compare`` reads like any other run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from ..baselines import BASELINES, build_baseline
from ..config import ConfigError, load_config, save_config
from ..files import write_text

__all__ = ["baseline_config", "run_baseline"]


def baseline_config(method: str, bits: int, overrides: Sequence[str] = (), run_dir: Optional[Path] = None,
                    config_files: Sequence[str] = (), config_dir: Optional[Path] = None):
    """The run config of a baseline: a deep run's ``config.yaml`` (``run_dir``) or the data set's config,
    then ``overrides``; cached features on, ``experiment`` = ``method``, ``model.bits`` = ``bits``."""
    if method not in BASELINES:
        raise ConfigError(f"baseline {method!r}: expected one of {', '.join(BASELINES)}")
    files = list(config_files)
    if run_dir is not None:
        saved = Path(run_dir) / "config.yaml"
        if not saved.is_file():
            raise FileNotFoundError(f"{run_dir}: no config.yaml (give a run folder written by dsrh train)")
        files.insert(0, str(saved))
    cfg = load_config(list(overrides) + ["data.cache_features=true", f"model.bits={int(bits)}"],
                      config_files=files, config_dir=config_dir)
    cfg.experiment = method
    cfg.resume = ""
    given = {str(o).split("=", 1)[0].lstrip("+~") for o in overrides}
    if "name" not in given:
        cfg.name = ""  # a deep run's own name would make its folder the baseline's: a fresh name instead
    if "overwrite" not in given:
        cfg.overwrite = False  # a deep run's overwrite=true must not delete a run the baseline's name points at
    return cfg


def _evaluate(cfg, q, db, ql, dl) -> Dict[str, float]:
    """Every metric the eval config asks for, with its options read the way the evaluation callback reads
    them (``options_from``: a metric added by a ``MetricSpec`` reaches baselines too)."""
    from ..metrics import retrieval_metrics
    from ..metrics.specs import options_from

    e = cfg.eval
    m = retrieval_metrics(q, db, ql, dl, ties=e.ties, empty_queries=e.empty_queries,
                          **options_from(lambda name: e.get(name)))
    return {f"test/{k}": float(v) for k, v in m.items() if isinstance(v, (int, float))}


def run_baseline(cfg, plots: bool = True, fmt: str = "png") -> Dict[str, Any]:
    """Fit ``cfg.experiment`` (lsh | pcah | itq | sh) with ``cfg.model.bits`` bits and seed ``cfg.seed`` on the
    training features, evaluate the test queries against the database, write the run folder; returns the
    metrics (as written to ``metrics.json``)."""
    import torch

    from .folders import claim_run_folder, resolve_run

    torch.manual_seed(int(cfg.seed))
    run_dir, _ = resolve_run(cfg)
    # Like dsrh train: refuse a folder that holds a run (overwrite=true replaces it) or that another process
    # writes, before anything is written; the lock is held until the folder is complete.
    lock, _ = claim_run_folder(cfg, run_dir, None)
    try:
        return _run(cfg, run_dir, plots, fmt)
    finally:
        lock.release()


def _run(cfg, run_dir: Path, plots: bool, fmt: str) -> Dict[str, Any]:
    from ..data.datamodule import HashingDataModule
    from ..lightning.callbacks.plots import image_getter
    from ..models import build_backbone

    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.prepare_data()
    dm.setup("fit")
    rows = dm.train.images  # FeatureRows: the cached features of every split

    def features(split: str) -> np.ndarray:
        return rows.gather(getattr(dm.split, split)).numpy()

    labels = np.asarray(dm.source.labels)
    start = time.perf_counter()
    model = build_baseline(cfg.experiment, int(cfg.model.bits), int(cfg.seed)).fit(features("train"))
    fit_seconds = time.perf_counter() - start
    q, db = model.encode(features("query")), model.encode(features("database"))
    ql, dl = labels[dm.split.query], labels[dm.split.database]
    metrics = _evaluate(cfg, q, db, ql, dl)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    results: Dict[str, Any] = {"run_dir": str(run_dir), "method": cfg.experiment, "bits": int(cfg.model.bits),
                               "seed": int(cfg.seed), "feature_cache": str(getattr(dm, "feature_cache", "")),
                               "fit_seconds": round(fit_seconds, 3), **metrics}
    if plots:
        _write_plots(cfg, dm, run_dir / "plots", q, db, ql, dl, metrics, fmt, image_getter)
    write_text(run_dir / "metrics.json", json.dumps(results, indent=2))
    print(f"[{cfg.experiment} {int(cfg.model.bits)} bits, test] map={metrics['test/map']:.4f}  "
          f"precision_radius={metrics['test/precision_radius']:.4f}  -> {run_dir}", flush=True)
    return results


def _write_plots(cfg, dm, out: Path, q, db, ql, dl, metrics, fmt, image_getter) -> None:
    """The same figures and curves.json as a deep run's test end (a failure only warns)."""
    import logging

    from ..plots.figures import (CURVES_FILE, curve_record, make_figures, run_details, run_identity,
                                 save_figures)

    try:
        made = make_figures(q, db, ql, dl, empty_queries=cfg.eval.empty_queries, ties=cfg.eval.ties,
                            identity=run_identity(cfg),
                            details=run_details("test", None, metrics["test/map"]),
                            class_names=getattr(dm.source, "class_names", None),
                            query_image=image_getter(dm, dm.query), db_image=image_getter(dm, dm.database))
        out.mkdir(parents=True, exist_ok=True)
        record = curve_record(made["data"], split="test", step=None, dataset=cfg.data.dataset,
                              method=cfg.experiment, bits=int(cfg.model.bits), seed=int(cfg.seed),
                              metrics={k.split("/", 1)[1]: v for k, v in metrics.items()})
        write_text(out / CURVES_FILE, json.dumps(record, indent=1))
        save_figures(made["figures"], out, fmt=fmt)
    except Exception as exc:
        logging.getLogger(__name__).warning("baseline plots failed (%s: %s); the metrics are not affected",
                                            type(exc).__name__, exc)
