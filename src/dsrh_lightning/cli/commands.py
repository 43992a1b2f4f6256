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


def _split_data_args(items: Sequence[str]) -> Tuple[Optional[str], List[str], List[str]]:
    from ..search.images import ImageInputError

    split, overrides, paths = None, [], []
    for it in items:
        if it.startswith("split="):
            if split is not None:
                raise ImageInputError(f"more than one split given ({split}, {it[6:]}); write one codes file per split")
            split = it[len("split="):]
        elif Path(it).exists():
            paths.append(it)
        elif "=" in it:
            overrides.append(it)
        else:
            paths.append(it)
    if split is not None and paths:
        raise ImageInputError(f"give either split=... or image files/folders, not both (got split={split} and "
                              f"{paths[0]})")
    if split is None and overrides:
        raise ImageInputError(f"key=value overrides ({overrides[0]}) only apply with split=...")
    return split, overrides, paths


def cmd_index(args, extra: Sequence[str]) -> int:
    split, overrides, paths = _split_data_args(list(args.data) + list(extra))
    if args.batch_size < 0 or args.workers < 0:
        from ..errors import InputError
        raise InputError("--batch-size and --workers must be >= 0 (0: the default)")
    from ..search.images import find_images
    files = find_images(paths) if split is None else None  # before the checkpoint: bad paths fail fast

    from ..runs.checkpoints import load_run
    from ..search.codes_file import write_codes
    from ..search.encode import encode, encoder, image_dataset, split_dataset

    run = load_run(args.ckpt, overrides)
    cfg = run.cfg
    bs = args.batch_size or cfg.data.eval_batch_size
    if split is not None:
        ds, ids, labels = split_dataset(cfg, split)
        model = run.module  # a split of a feature-cached run yields the cached features
        source = f"split={split} of {cfg.data.dataset}"
    else:
        ds, ids, labels = image_dataset(files, cfg), [str(f) for f in files], None
        model = encoder(run)
        source = "images: " + ", ".join(paths)
    model.to(args.device)
    codes = encode(model, ds, cfg.eval.threshold, bs, args.workers, progress=not args.no_progress,
                   desc=f"encoding {len(ds)} images")
    write_codes(args.out, codes, ids, labels, checkpoint=str(Path(args.ckpt).resolve()), weights_hash=run.weights_hash,
                source=source)
    print(f"wrote {len(codes)} codes of {codes.shape[1]} bits ({source}) to {args.out}", file=sys.stderr)
    return 0


def cmd_search(args, extra: Sequence[str]) -> int:
    from .search_command import cmd_search as run_search  # tie groups, the query marked, how to see ids

    return run_search(args, extra)


HANDLERS = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "eval-codes": cmd_eval_codes,
            "sweep-local": cmd_sweep_local, "index": cmd_index, "search": cmd_search}
HANDLERS.update(EXTRA_HANDLERS)  # compare, baseline, show, serve
