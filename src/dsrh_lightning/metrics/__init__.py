"""Retrieval metrics on binary codes as pure functions (distributed gathering lives in the evaluation callback).

Names are imported on first use, so ``dsrh_lightning.metrics.specs`` (the metric table the command line
reads) does not import torch.
"""

from .. import lazy_exports

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


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
