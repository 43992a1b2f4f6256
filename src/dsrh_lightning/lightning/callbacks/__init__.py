"""Lightning callbacks: retrieval evaluation, retrieval plots."""

from .plots import RetrievalPlots
from .retrieval import RetrievalEvaluation

__all__ = ["RetrievalEvaluation", "RetrievalPlots"]
