"""Argument parsing of ``dsrh compare | baseline | show | serve`` (no heavy imports)."""

from __future__ import annotations

import argparse

__all__ = ["add_extra_parsers", "BASELINE_NAMES"]

BASELINE_NAMES = ("lsh", "pcah", "itq", "sh")  # baselines/__init__.py BASELINES (that one imports numpy)


def add_extra_parsers(sub) -> None:
    """Add the comparison, baseline, image and search-page commands to ``sub`` (argparse subparsers)."""
    p = sub.add_parser("compare", help="one table and overlaid plots of finished runs (deep or baseline)",
                       description="Reads each run folder's metrics.json, config.yaml and plots/curves.json.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (runs/<name>), e.g. runs/*")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where comparison.json and the plots go (default: <common parent of the runs>/comparison)")
    p.add_argument("--format", nargs="+", choices=("png", "pdf", "svg"), default=["png", "pdf"], dest="formats",
                   help="plot file formats (default png pdf)")
    p.add_argument("--no-plots", action="store_true", help="print the table only")
    p.add_argument("--wandb", action="store_true", help="also log the table and plots as one W&B run")
    p.add_argument("--project", default="dsrh-lightning", help="W&B project of --wandb")

    p = sub.add_parser("baseline", help="fit a classical hashing baseline (lsh, pcah, itq, sh) on cached features",
                       description="Features: those of a run (--run runs/<name>: its data set, backbone and image "
                                   "size) or of key=value overrides (e.g. dataset=cifar10 "
                                   "model.backbone=efficientnet_lite0 data.image_size=128); extracted once into "
                                   "data.feature_dir. Writes runs/<name>/ with metrics.json and plots/ like dsrh train.")
    p.add_argument("method", choices=BASELINE_NAMES, help="the baseline")
    p.add_argument("--bits", type=int, required=True, help="code length")
    p.add_argument("--run", default=None, metavar="RUN_DIR", help="take data and backbone from this run's config")
    p.add_argument("--seed", type=int, default=None, help="seed of the baseline's random parts (default: config seed)")
    p.add_argument("--no-plots", action="store_true", help="metrics only")
    p.add_argument("--config", action="append", default=[], metavar="FILE", help="extra YAML file (repeatable)")
    p.add_argument("--config-dir", default=None, help="folder with dataset/ and experiment/ YAMLs")

    p = sub.add_parser("show", help="the image behind an id such as cifar10#53001 (written as a PNG)",
                       description="Ids of in-memory data sets (<dataset>#<source index>, as dsrh index/search "
                                   "print them) are looked up in that data set; key=value overrides (data.root=...) "
                                   "or --ckpt give the data settings the index was made with.")
    p.add_argument("id", help="<dataset>#<index> or an image path")
    p.add_argument("--ckpt", default=None, help="take the data settings from this checkpoint")
    p.add_argument("--out", default=None, help="PNG to write (default: <dataset>_<index>.png here)")

    p = sub.add_parser("serve", help="a local search page over a codes file (Flask, 127.0.0.1 by default)")
    p.add_argument("--ckpt", required=True, help="checkpoint that encodes uploaded query images")
    p.add_argument("--index", required=True, help="codes file written by dsrh index (split=... or image folders)")
    p.add_argument("--host", default="127.0.0.1", help="loopback address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0 = any free port)")
    p.add_argument("--k", type=int, default=20, help="results per query (default 20)")


def add_explain_arg(p: argparse.ArgumentParser) -> None:
    """``dsrh config --explain KEY``."""
    p.add_argument("--explain", default=None, metavar="KEY",
                   help="print what a key means (e.g. model.bits, or a section such as data.protocol): type, "
                        "default, allowed values")
