"""Retrieval metrics on binary codes as pure functions (distributed gathering lives in the evaluation callback).

Names are imported on first use, so ``dsrh_lightning.metrics.specs`` (the metric table the command line
reads) does not import torch.
"""

from importlib import import_module

_EXPORTS = {
    "binarize": "codes",
    "bits_to_pm1": "codes",
    "codes_to_bits": "codes",
    "hamming_distance": "codes",
    "retrieval_metrics": "retrieval",
    "METRICS": "specs",
    "MetricSpec": "specs",
    "ratio": "specs",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
