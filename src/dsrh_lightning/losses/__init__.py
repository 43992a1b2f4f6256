"""Losses: pure functions of codes / logits and triplet indices, the ranking methods built on them
(``nn.Module`` classes built from keyword arguments, found by config name through :mod:`.registry`,
built from a run config by :mod:`.from_config`) and the miners that choose their triplets.

Names are imported on first use, so ``dsrh_lightning.losses.registry`` (read by the config) does not
import torch.
"""

from .. import lazy_exports

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
    "AllTriplets": "miners",
    "ExplicitTriplets": "miners",
    "HardestTriplets": "miners",
    "MultilevelTriplets": "miners",
    "SemiHardTriplets": "miners",
    "Triplets": "miners",
    "RankingLoss": "base",
    "RankingResult": "base",
    "TripletRanking": "triplet",
    "WeightedRanking": "semantic_ranking",
    "build_miner": "from_config",
    "build_ranking_loss": "from_config",
    "get_ranking_loss": "registry",
    "register": "registry",
    "ranking_names": "registry",
}

__all__ = sorted(_EXPORTS)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
