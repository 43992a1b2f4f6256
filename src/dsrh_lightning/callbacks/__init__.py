"""Lightning callbacks: retrieval evaluation."""

from .retrieval import RetrievalEvaluation

__all__ = ["RetrievalEvaluation"]
