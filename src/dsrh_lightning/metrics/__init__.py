"""Retrieval metrics on binary codes: pure tensor functions plus a thin torchmetrics wrapper."""

from .codes import binarize, bits_to_pm1, codes_to_bits, hamming_distance
from .evaluator import RetrievalEvaluator
from .retrieval import retrieval_metrics

__all__ = [
    "binarize",
    "bits_to_pm1",
    "codes_to_bits",
    "hamming_distance",
    "retrieval_metrics",
    "RetrievalEvaluator",
]
