"""Command line: ``dsrh train | eval | eval-codes | index | search | config | sweep-local``. Parses, loads config, calls; nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from .config import ConfigError, load_config

__all__ = ["main"]


class UserError(Exception):
    """An error caused by input the user can fix; printed without a traceback."""


def _user_errors():
    from .data.sources import DataNotFoundError
    from .index import ImageInputError, IndexFileError
    from .models.backbones import WeightsUnavailableError

    return (ConfigError, DataNotFoundError, WeightsUnavailableError, UserError, FileNotFoundError, ValueError,
            FloatingPointError, ImageInputError, IndexFileError)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="extra YAML file merged after dataset/experiment files (repeatable)")
    p.add_argument("--config-dir", default=None, help="folder with dataset/ and experiment/ YAMLs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrh", description="Deep supervised hashing for image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a hashing model",
                       description="Overrides: key=value or --key=value, e.g. dataset=cifar10 experiment=dsrh "
                                   "model.bits=48. `dsrh config ...` prints the resolved config.")
    _add_config_args(p)

    p = sub.add_parser("config", help="print the resolved configuration")
    _add_config_args(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test queries vs the database")
    p.add_argument("--ckpt", required=True, help="checkpoint written by dsrh train")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write the retrieval plots as PNG files to DIR")

    p = sub.add_parser("sweep-local", help="run a W&B sweep file locally and offline (sweeps engine proposes runs)",
                       description="Extra overrides (key=value) are added to every run after the swept values.")
    from . import sweep_local

    sweep_local.build_parser(p)

    from . import eval_codes, index

    p = sub.add_parser("eval-codes", help="evaluate binary codes from any method (.npz files)")
    eval_codes.build_parser(p)

    p = sub.add_parser("index", help="encode a data split or image folders into a codes file")
    index.build_index_parser(p)
    p = sub.add_parser("search", help="exact Hamming search of query images in a codes file")
    index.build_search_parser(p)
    return parser


def _load(args, overrides: List[str]):
    return load_config(overrides, config_files=args.config, config_dir=Path(args.config_dir) if args.config_dir else None)


def cmd_train(args, overrides: List[str]) -> int:
    cfg = _load(args, overrides)
    from .train import train

    results = train(cfg)
    print(json.dumps({k: v for k, v in results.items()}, indent=2))
    return 0


def cmd_config(args, overrides: List[str]) -> int:
    from omegaconf import OmegaConf

    print(OmegaConf.to_yaml(_load(args, overrides)))
    return 0


def cmd_eval(args, overrides: List[str]) -> int:
    from .evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(Path(args.ckpt), overrides, plots_dir=Path(args.plots) if args.plots else None)
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    if rank_zero_only.rank != 0:  # DDP evaluation: every rank has the same gathered metrics; print once
        return 0
    if args.json:
        print(json.dumps(results))
    else:
        for k, v in results.items():
            print(f"{k:>28s}  {v}")
    return 0


def cmd_sweep_local(args, overrides: List[str]) -> int:
    from . import sweep_local

    return sweep_local.run(args, overrides)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "eval-codes":
        if unknown:
            parser.error(f"unrecognised arguments: {' '.join(unknown)}")
        from . import eval_codes

        return eval_codes.run(args)
    from . import index

    handlers = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "sweep-local": cmd_sweep_local,
                "index": index.run_index, "search": index.run_search}
    try:
        return handlers[args.command](args, unknown)
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
