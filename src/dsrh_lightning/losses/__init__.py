"""Losses: pure functions of codes / logits and triplet indices, the ranking methods built on them
(``nn.Module`` classes, found by config name through :mod:`.registry`) and the in-batch miners.

Names are imported on first use, so ``dsrh_lightning.losses.registry`` (read by the config) does not
import torch.
"""

from importlib import import_module

_EXPORTS = {
    "balance_penalty": "semantic_ranking",
    "classification_loss": "classification",
    "effective_margin": "triplet",
    "hamming_surrogate": "semantic_ranking",
    "mined_triplet_loss": "triplet",
    "mined_weighted_ranking_loss": "semantic_ranking",
    "orthogonality_penalty": "orthogonality",
    "triplet_ranking_loss": "triplet",
    "weighted_ranking_loss": "semantic_ranking",
    "RankingLoss": "base",
    "RankingResult": "base",
    "build_ranking_loss": "registry",
    "get_ranking_loss": "registry",
    "register": "registry",
    "ranking_names": "registry",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
