"""Retrieval metrics on binary codes as pure functions (distributed gathering lives in the evaluation callback)."""

from .codes import binarize, bits_to_pm1, codes_to_bits, hamming_distance
from .retrieval import retrieval_metrics

__all__ = [
    "binarize",
    "bits_to_pm1",
    "codes_to_bits",
    "hamming_distance",
    "retrieval_metrics",
]
