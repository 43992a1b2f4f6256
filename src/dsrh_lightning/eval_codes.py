"""``dsrh eval-codes``: retrieval metrics from saved binary codes (.npz files).

Each file holds ``codes`` (n x k, {0,1} or {-1,+1}) and ``labels`` (n class ids or
n x c multi-hot). Bad input exits with code 2 and ``error: <file>: <message>``.
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["build_parser", "run", "main", "load_codes", "CodesFileError"]


class CodesFileError(ValueError):
    """A codes file is missing or malformed; ``str()`` is ``<file>: <message>``."""

    def __init__(self, path, message: str) -> None:
        super().__init__(f"{path}: {message}")


def load_codes(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Load and check ``codes`` (n, k) and ``labels`` (n,) or (n, c) from an .npz file."""
    p = Path(path)
    if not p.is_file():
        raise CodesFileError(p, "file not found (expected an .npz with arrays 'codes' and 'labels')")
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise CodesFileError(p, "not an .npz archive (expected arrays 'codes' and 'labels')")
            missing = [k for k in ("codes", "labels") if k not in z.files]
            if missing:
                raise CodesFileError(
                    p, f"missing array(s) {missing}; found keys {sorted(z.files)}; expected 'codes' and 'labels'"
                )
            codes, labels = z["codes"], z["labels"]
    except CodesFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CodesFileError(p, f"cannot read as .npz ({exc}); expected arrays 'codes' and 'labels'") from exc
    if codes.ndim != 2:
        raise CodesFileError(p, f"'codes' must be 2-D (n, bits), got shape {codes.shape}")
    if not (np.issubdtype(codes.dtype, np.number) or codes.dtype == bool):
        raise CodesFileError(p, f"'codes' must be numeric, got dtype {codes.dtype}")
    vals = np.unique(codes)
    if not (set(vals.tolist()) <= {0, 1} or set(vals.tolist()) <= {-1, 1}):
        shown = vals[:8].tolist()
        raise CodesFileError(p, f"'codes' must be all {{0,1}} or all {{-1,+1}}; found values {shown}")
    if labels.shape[:1] != codes.shape[:1]:
        raise CodesFileError(p, f"'labels' has {labels.shape[0] if labels.ndim else 0} rows but 'codes' has {codes.shape[0]}")
    from .relevance import validate_labels

    try:
        validate_labels(labels, "'labels'")
    except ValueError as exc:
        raise CodesFileError(p, str(exc)) from exc
    return codes, labels


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """Add the eval-codes options to ``parser`` (or a new one) and return it."""
    if parser is None:
        parser = argparse.ArgumentParser(prog="dsrh eval-codes", description=__doc__.splitlines()[0])
    parser.add_argument("--query", required=True, help="query .npz (codes, labels)")
    parser.add_argument("--database", required=True, help="database .npz (codes, labels)")
    parser.add_argument("--topk", type=int, default=None, help="MAP cut-off (default: whole database)")
    parser.add_argument("--radius", type=int, default=2, help="Hamming radius for precision_radius")
    parser.add_argument("--ndcg-k", type=int, default=None)
    parser.add_argument("--acg-k", type=int, default=None)
    parser.add_argument("--wmap-topk", type=int, default=None)
    parser.add_argument("--precision-at", type=int, nargs="*", default=[])
    parser.add_argument("--ties", choices=("stable", "average"), default="stable")
    parser.add_argument("--empty-queries", choices=("zero", "skip"), default="zero")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def run(args: argparse.Namespace) -> int:
    """Evaluate the files named in ``args``; print results; return the exit code."""
    from .metrics import retrieval_metrics

    try:
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
        try:
            res = retrieval_metrics(
                qc, dc, qlab, dlab, topk=args.topk, radius=args.radius, precision_at=tuple(args.precision_at),
                ndcg_k=args.ndcg_k, acg_k=args.acg_k, wmap_topk=args.wmap_topk, ties=args.ties,
                empty_queries=args.empty_queries,
            )
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


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point: ``python -m dsrh_lightning.eval_codes --query Q.npz --database D.npz``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
