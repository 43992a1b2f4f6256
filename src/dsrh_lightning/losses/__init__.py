"""Losses as pure functions of codes / logits and triplet indices (they never mine or load data)."""

from .classification import classification_loss
from .orthogonality import orthogonality_penalty
from .semantic_ranking import balance_penalty, hamming_surrogate, weighted_ranking_loss
from .triplet import effective_margin, triplet_ranking_loss

__all__ = [
    "balance_penalty", "classification_loss", "effective_margin", "hamming_surrogate", "orthogonality_penalty",
    "triplet_ranking_loss", "weighted_ranking_loss",
]
