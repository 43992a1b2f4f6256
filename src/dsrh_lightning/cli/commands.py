"""The ``dsrh`` commands. Each imports what it needs (torch, lightning, ...) when it runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .extra_commands import EXTRA_HANDLERS

__all__ = ["HANDLERS"]


def _load(args, overrides: List[str]):
    from ..config import load_config

    return load_config(overrides, config_files=args.config,
                       config_dir=Path(args.config_dir) if args.config_dir else None)


def cmd_train(args, overrides: List[str]) -> int:
    cfg = _load(args, overrides)
    from ..runs.train import train

    results = train(cfg)
    print(json.dumps({k: v for k, v in results.items()}, indent=2))
    return 0


def cmd_config(args, overrides: List[str]) -> int:
    if getattr(args, "explain", None):
        from .extra_commands import cmd_explain

        return cmd_explain(args, overrides)
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_load(args, overrides)))
    return 0


def cmd_eval(args, overrides: List[str]) -> int:
    from ..runs.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(Path(args.ckpt), overrides, plots_dir=Path(args.plots) if args.plots else None,
                                  plots_format=args.plots_format)
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP evaluation: every rank has the same gathered metrics; print once
        return 0
    if args.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:>28s}  {v}")
    return 0


def cmd_eval_codes(args, overrides: List[str]) -> int:
    from ..runs import eval_codes

    return eval_codes.run(args)


def cmd_sweep_local(args, overrides: List[str]) -> int:
    from ..config import normalise_overrides
    from ..runs.sweep_local import run_sweep_local

    records = run_sweep_local(args.sweep, args.count, normalise_overrides(overrides), args.output_dir, args.seed)
    failed = [r["name"] for r in records if r["state"] != "finished"]
    if failed:
        print(f"sweep-local: {len(failed)} of {len(records)} runs failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def cmd_index(args, extra: Sequence[str]) -> int:
    from .index_commands import cmd_index as run_index  # sharded, resumable, on trainer.* devices

    return run_index(args, extra)


def cmd_export(args, extra: Sequence[str]) -> int:
    from .index_commands import cmd_export as run_export  # TorchScript / ONNX: uint8 images -> codes

    return run_export(args, extra)


def cmd_search(args, extra: Sequence[str]) -> int:
    from .search_command import cmd_search as run_search  # tie groups, the query marked, how to see ids

    return run_search(args, extra)


HANDLERS = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "eval-codes": cmd_eval_codes,
            "sweep-local": cmd_sweep_local, "index": cmd_index, "search": cmd_search,
            "export": cmd_export}
HANDLERS.update(EXTRA_HANDLERS)  # compare, baseline, show, serve
