"""``dsrh eval-codes``: retrieval metrics from saved binary codes (.npz files).

Each file holds ``codes`` (n x k, {0,1} or {-1,+1}) and ``labels`` (n integer class ids
or n x c 0/1 multi-hot), or is a codes file with labels written by ``dsrh index split=...``.
Files (or sharded index folders) are read by :func:`dsrh_lightning.search.read_index`.
Bad input exits with code 2 and ``error: <file>: <message>``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ..search.codes_file import CodesFileError
from ..search.shards import read_index

__all__ = ["run", "load_codes", "CodesFileError"]


def load_codes(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """``(codes (n, bits) uint8 in {0,1}, labels)`` of a codes file; raises :class:`CodesFileError`."""
    index = read_index(path, require_labels=True)  # a codes file or a sharded index folder
    return index.unpacked(), index.labels


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_cutoffs(args) -> None:
    """Reject negative cut-offs and radii before any file is read (flags come from the metric specs)."""
    from ..metrics.specs import metric_options

    for name, spec in metric_options().items():
        val, flag = getattr(args, name, None), _flag(name)
        if val is None:
            continue
        if spec.kind == "cutoffs":
            bad = [k for k in val if k < 1]
            if bad:
                raise CodesFileError("arguments", f"{flag} values must be >= 1, got {bad}")
        elif spec.kind == "radius" and val < 0:
            raise CodesFileError("arguments", f"{flag} must be >= 0, got {val}")
        elif spec.kind != "radius" and val < 0:
            meaning = "for the whole database" if spec.kind == "topk" else "to leave the metric out"
            raise CodesFileError("arguments", f"{flag} must be >= 0, got {val}; use 0 (or leave {flag} out) {meaning}")


def run(args: argparse.Namespace) -> int:
    """Evaluate the files named in ``args``; print results; return the exit code."""
    try:
        _check_cutoffs(args)
        qc, qlab = load_codes(args.query)
        dc, dlab = load_codes(args.database)
        if qc.shape[1] != dc.shape[1]:
            raise CodesFileError(
                args.database, f"codes have {dc.shape[1]} bits but {args.query} codes have {qc.shape[1]}; both must match"
            )
        if qlab.ndim != dlab.ndim or (qlab.ndim == 2 and qlab.shape[1] != dlab.shape[1]):
            raise CodesFileError(
                args.database,
                f"labels have shape {dlab.shape[1:] or '(n,)'} per item but {args.query} labels have "
                f"{qlab.shape[1:] or '(n,)'}; both must be class ids or multi-hot of the same width",
            )
        from ..metrics import retrieval_metrics
        from ..metrics.specs import options_from

        try:
            res = retrieval_metrics(qc, dc, qlab, dlab, ties=args.ties, empty_queries=args.empty_queries,
                                    **options_from(lambda name: getattr(args, name, None)))
        except ValueError as exc:
            raise CodesFileError("arguments", str(exc)) from exc
    except CodesFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res))
    else:
        width = max(len(k) for k in res)
        for key, val in res.items():
            text = f"{val:.6f}" if isinstance(val, float) else str(val)
            print(f"{key:<{width}}  {text}")
    return 0
