"""Losses as pure functions of codes / logits and triplet indices (they never mine or load data)."""

from .classification import classification_loss
from .orthogonality import orthogonality_penalty
from .triplet import effective_margin, triplet_ranking_loss

__all__ = ["classification_loss", "effective_margin", "orthogonality_penalty", "triplet_ranking_loss"]
