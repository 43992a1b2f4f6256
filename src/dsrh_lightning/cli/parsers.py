"""Argument parsing of every ``dsrh`` command. Imports nothing heavy (no torch, lightning, numba,
wandb, matplotlib): ``dsrh --help`` and config errors answer at once."""

from __future__ import annotations

import argparse

from .extra_parsers import add_explain_arg, add_extra_parsers

__all__ = ["build_parser", "add_eval_codes_args", "add_index_args", "add_search_args", "PLOT_FORMATS"]

PLOT_FORMATS = ("png", "pdf", "svg")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="FILE",
                   help="extra YAML file merged after dataset/experiment files (repeatable)")
    p.add_argument("--config-dir", default=None, help="folder with dataset/ and experiment/ YAMLs")


def add_eval_codes_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--query", required=True, help="query .npz (codes, labels) or a `dsrh index` codes file")
    parser.add_argument("--database", required=True,
                        help="database .npz (codes, labels) or a `dsrh index` codes file with labels")
    from ..metrics.specs import metric_options  # the metrics' cut-off options (a torch-free table)

    for name, spec in metric_options().items():  # --topk, --radius, --precision-at, --ndcg-k, ...
        many = dict(nargs="*", default=list(spec.default)) if spec.kind == "cutoffs" else dict(default=spec.default)
        parser.add_argument("--" + name.replace("_", "-"), type=int, help=spec.help or None, **many)
    parser.add_argument("--ties", choices=("stable", "average"), default="stable")
    parser.add_argument("--empty-queries", choices=("zero", "skip"), default="zero")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def add_index_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by dsrh train")
    p.add_argument("--out", required=True,
                   help="a folder: a sharded index (manifest.json + shard-00000.npz ...); or a file ending .npz: "
                        "one codes file. Running the same command again continues an unfinished index")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="split=database|query|train of the checkpoint's data set (key=value overrides such as "
                        "data.root=PATH may follow), or image files / folders (searched recursively; stored "
                        "as absolute paths). trainer.devices=N trainer.num_nodes=M trainer.strategy=ddp "
                        "trainer.precision=... spread the encoding over devices and machines as for training")
    p.add_argument("--shard-size", type=int, default=100_000, help="images per shard (default 100000)")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: data.eval_batch_size)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers per process (default 0)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N: one process on that device (default: the checkpoint's trainer.* "
                        "keys and their overrides)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by dsrh train")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx"), help="file format of the model")
    p.add_argument("--out", required=True, help="file to write (.pt for TorchScript, .onnx for ONNX)")
    p.add_argument("--batch-size", type=int, default=1,
                   help="images per call in the example input (the batch dimension stays dynamic)")


def add_search_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", required=True, help="codes file or sharded index folder written by dsrh index")
    p.add_argument("--ckpt", required=True, help="checkpoint that encodes the query images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--engine", choices=("auto", "numba", "faiss", "torch"), default="auto",
                   help="exact search engine (auto: numba's popcount scan when installed, else faiss, else torch); "
                        "all give identical results")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="cpu", help="torch device for encoding (default cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsrh", description="Deep supervised hashing for image retrieval.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a hashing model",
                       description="Overrides: key=value or --key=value, e.g. dataset=cifar10 experiment=dsrh "
                                   "model.bits=48. `dsrh config ...` prints the resolved config.")
    _add_config_args(p)

    p = sub.add_parser("config", help="print the resolved configuration, or what a key means (--explain KEY)")
    _add_config_args(p)
    add_explain_arg(p)

    p = sub.add_parser("eval", help="evaluate a checkpoint on the test queries vs the database")
    p.add_argument("--ckpt", required=True, help="checkpoint written by dsrh train")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plots", default=None, metavar="DIR", help="also write the retrieval plots to DIR")
    p.add_argument("--plots-format", choices=PLOT_FORMATS, default="png",
                   help="file format of --plots (default png, 200 dpi)")

    p = sub.add_parser("sweep-local", help="run a W&B sweep file locally and offline (sweeps engine proposes runs)",
                       description="Extra overrides (key=value) are added to every run after the swept values.")
    add_sweep_local_args(p)

    p = sub.add_parser("eval-codes", help="evaluate binary codes from any method (.npz files)")
    add_eval_codes_args(p)
    p = sub.add_parser("index", help="encode a data split or image folders into a codes file")
    add_index_args(p)
    p = sub.add_parser("search", help="exact Hamming search of query images in a codes file")
    add_search_args(p)
    p = sub.add_parser("export", help="export image -> code (uint8 images in, packed codes out) to TorchScript "
                                      "or ONNX")
    add_export_args(p)
    add_extra_parsers(sub)
    return parser


def add_sweep_local_args(p) -> None:
    """The options of ``dsrh sweep-local``."""
    p.add_argument("sweep", help="sweep file (a path, or a name under experiments/sweeps/)")
    p.add_argument("--count", type=int, default=0, help="runs to start (0 = the whole grid; required otherwise)")
    p.add_argument("--output-dir", default=None, help="where runs and sweep_state.json go "
                                                      "(default runs/sweeps/<sweep name>; reused to continue)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random/bayes proposals")
