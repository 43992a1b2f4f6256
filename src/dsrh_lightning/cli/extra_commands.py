"""``dsrh compare | baseline | show | serve`` and ``dsrh config --explain``: one function per command,
each importing what it needs when it runs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Sequence

__all__ = ["EXTRA_HANDLERS", "cmd_explain", "common_parent", "print_comparison"]


def cmd_explain(args, overrides: List[str]) -> int:
    from .explain import explain

    if overrides:
        from ..errors import InputError

        raise InputError(f"--explain takes one key; unexpected {' '.join(overrides)}")
    print(explain(args.explain))
    return 0


def common_parent(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every path (the paths' common parent)."""
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in paths]))


def print_comparison(run_dirs: Sequence[Path], out=None, formats: Sequence[str] = ("png", "pdf"),
                     wandb_project: str = "", stream=None):
    """Read the runs, print the table and the best run, write the plots under ``out`` (None: none);
    with ``wandb_project``, also log them to W&B. Returns the rows."""
    from ..runs.compare import best_run, format_table, log_to_wandb, read_run, write_comparison

    stream = stream or sys.stdout
    rows = [read_run(p) for p in run_dirs]
    print(format_table(rows), file=stream)
    best = best_run(rows)
    print(f"best run: {best.path} (MAP {best.map:.4f}, {best.method}, {best.bits} bits)", file=stream)
    written = {}
    if out is not None:
        written = write_comparison(rows, out, formats)
        print(f"comparison written to {out}: {', '.join(sorted(p.name for p in written.values()))}", file=stream)
    if wandb_project:
        log_to_wandb(rows, written, wandb_project)
    return rows


def cmd_compare(args, extra: Sequence[str]) -> int:
    if extra:
        from ..errors import InputError

        raise InputError(f"unrecognised arguments: {' '.join(extra)}")
    runs = [Path(p) for p in args.runs]
    out = None if args.no_plots else Path(args.out) if args.out else common_parent(runs) / "comparison"
    print_comparison(runs, out, args.formats, args.project if args.wandb else "")
    return 0


def cmd_baseline(args, overrides: List[str]) -> int:
    from ..config import normalise_overrides
    from ..runs.baseline import baseline_config, run_baseline

    items = normalise_overrides(overrides)
    if args.seed is not None:
        items.append(f"seed={args.seed}")
    cfg = baseline_config(args.method, args.bits, items, run_dir=Path(args.run) if args.run else None,
                          config_files=args.config, config_dir=Path(args.config_dir) if args.config_dir else None)
    run_baseline(cfg, plots=not args.no_plots)
    return 0


def cmd_show(args, overrides: List[str]) -> int:
    from ..serve.ids import image_of_id, write_png

    img, label = image_of_id(args.id, overrides, ckpt=args.ckpt)
    out = Path(args.out) if args.out else Path(args.id.replace("#", "_").replace("/", "_") + ".png")
    if out.suffix.lower() != ".png":
        out = out.with_suffix(".png")
    write_png(out, img)
    print(f"{args.id}: {img.shape[1]} x {img.shape[0]} px, label {label} -> {out}")
    return 0


def cmd_serve(args, extra: Sequence[str]) -> int:
    if extra:
        from ..errors import InputError

        raise InputError(f"unrecognised arguments: {' '.join(extra)}")
    from ..serve.app import serve

    return serve(args.ckpt, args.index, host=args.host, port=args.port, k=args.k)


EXTRA_HANDLERS = {"compare": cmd_compare, "baseline": cmd_baseline, "show": cmd_show, "serve": cmd_serve}
