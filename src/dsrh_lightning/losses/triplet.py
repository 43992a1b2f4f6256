"""Triplet ranking hinge of DSRH (Yao et al. 2016, Eq. 2)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .base import RankingLoss, RankingResult, check_choice, check_non_negative, check_positive_int
from .miners import AllTriplets, HardestTriplets, SemiHardTriplets, Triplets, squared_distances

__all__ = ["MININGS", "TripletRanking", "effective_margin", "make_miner", "mined_triplet_loss", "triplet_hinge",
           "triplet_ranking_loss"]


def effective_margin(margin: float, bits: int, scaling: str = "constant") -> float:
    """The margin used for ``bits``-bit codes.

    ``constant`` keeps the paper's margin (1.0) at every code length; ``per_bit``
    multiplies it by ``bits`` (squared distances between codes in [0,1]^bits grow
    with ``bits``, so a per-bit margin keeps the hinge's relative strength).
    """
    if scaling == "constant":
        return float(margin)
    if scaling == "per_bit":
        return float(margin) * bits
    raise ValueError(f"loss.margin_scaling={scaling!r}: expected 'constant' or 'per_bit'")


AVERAGES = ("all", "active")
# Which in-batch triplets the hinge sees: every valid one (the paper), the semi-hard ones (negative farther
# than the positive but within the margin, Schroff et al. 2015) or each anchor's hardest positive and negative
# (Hermans et al. 2017).
MININGS = ("all", "semihard", "hard")


def _average(hinge: torch.Tensor, valid: Optional[torch.Tensor], average: str) -> torch.Tensor:
    """Mean of ``hinge`` over the ``valid`` entries (all entries when None): over every one (``all``)
    or over those with a positive hinge (``active``); 0 when there are none."""
    if average not in AVERAGES:
        raise ValueError(f"loss.triplet_average={average!r}: expected one of {AVERAGES}")
    if valid is None and average == "all":
        return hinge.mean()
    if valid is not None:
        hinge = torch.where(valid, hinge, 0.0)
    count = (hinge > 0).sum() if average == "active" else valid.sum()
    return hinge.sum() / count.clamp(min=1)


def triplet_ranking_loss(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         margin: float = 1.0, average: str = "all") -> torch.Tensor:
    """Mean over triplets of ``max(0, margin - ||q - n||^2 + ||q - p||^2)``.

    Args:
        query, positive, negative: ``(t, k)`` relaxed codes (sigmoid outputs in [0, 1]).
        margin: hinge margin (paper: 1).
        average: ``all`` divides the summed hinge by the number of triplets (the paper's mean);
            ``active`` by the number of triplets whose hinge is positive (Hermans et al. 2017's
            "batch all"), so the step does not shrink as more triplets are satisfied.

    Returns:
        Scalar tensor (0 for an empty batch of triplets). Computed in float32.
    """
    if not (query.shape == positive.shape == negative.shape) or query.ndim != 2:
        raise ValueError(f"expected three (t, k) tensors, got {tuple(query.shape)}, {tuple(positive.shape)}, "
                         f"{tuple(negative.shape)}")
    if query.shape[0] == 0:
        return query.new_zeros((), dtype=torch.float32)
    q, p, n = query.float(), positive.float(), negative.float()
    d_pos = (q - p).pow(2).sum(1)
    d_neg = (q - n).pow(2).sum(1)
    return _average(torch.clamp(margin - d_neg + d_pos, min=0), None, average)


def triplet_hinge(codes: torch.Tensor, triplets: Triplets, margin: float = 1.0, average: str = "all"
                  ) -> torch.Tensor:
    """:func:`triplet_ranking_loss` over mined ``triplets`` of the batch's ``codes (b, k)``, from one ``(b, b)``
    squared-distance matrix.

    Mask form: the hinge ``margin - D[a, n] + D[a, p]`` is evaluated on the ``(b, b, b)`` grid and averaged over
    the mask (no host synchronisation). Index form: read at the triples' entries of ``D`` (averaged over the
    ``valid`` ones when given). Explicit triplets (``by_role``) gather the three role matrices instead, which is
    ``triplet_ranking_loss(codes[a], codes[p], codes[n])``. Returns a scalar float32 (0 without triplets).
    """
    if triplets.by_role:
        a, p, n = triplets.indices()
        return triplet_ranking_loss(codes[a], codes[p], codes[n], margin, average)
    dist = squared_distances(codes)  # (b, b) squared distances
    if triplets.mask is not None:
        hinge = torch.clamp(margin - dist.unsqueeze(1) + dist.unsqueeze(2), min=0)  # [a, p, n]
        return _average(hinge, triplets.mask, average)
    a, p, n = triplets.anchor, triplets.positive, triplets.negative
    return _average(torch.clamp(margin - dist[a, n] + dist[a, p], min=0), triplets.valid, average)


def mined_triplet_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, max_triplets: int = 0,
                       generator: Optional[torch.Generator] = None, average: str = "all", mining: str = "all"
                       ) -> Tuple[torch.Tensor, Union[torch.Tensor, float]]:
    """:func:`triplet_hinge` over the in-batch triplets the ``mining`` miner selects (:data:`MININGS`).

    With ``mining="all"`` equal to ``triplet_ranking_loss(codes[a], codes[p], codes[n], margin, average)`` with
    ``a, p, n = mine_all_triplets(labels, max_triplets, generator)`` (same subset draw). ``mining="semihard"``
    keeps the valid triplets with ``D[a, p] < D[a, n] < D[a, p] + margin`` (Schroff et al. 2015; with
    ``average="active"`` the upper bound changes nothing, as the hinge is 0 beyond it); ``mining="hard"``
    uses one triplet per anchor, its farthest positive and nearest negative (anchors without either are left
    out), and ``average`` then runs over anchors. Neither subsamples (``max_triplets`` must be 0).

    Args:
        codes: ``(b, k)`` relaxed codes in [0, 1].
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        margin, max_triplets, generator, average: as :func:`triplet_ranking_loss` and
            :func:`~dsrh_lightning.losses.miners.mine_all_triplets`.
        mining: one of :data:`MININGS`.

    Returns:
        ``(loss, count)``: the scalar float32 loss (0 without triplets) and the number of triplets used.
    """
    miner = make_miner(mining, margin, max_triplets)
    triplets = miner(codes, labels, generator)
    return triplet_hinge(codes, triplets, margin, average), triplets.count()


def make_miner(mining: str, margin: float = 1.0, max_triplets: int = 0):
    """The in-batch miner called ``mining`` (:data:`MININGS`); only ``"all"`` subsamples (``max_triplets``)."""
    if mining not in MININGS:
        raise ValueError(f"loss.triplet_mining={mining!r}: expected one of {MININGS}")
    if mining != "all" and max_triplets:
        raise ValueError(f"loss.triplet_mining={mining!r} does not subsample: data.max_triplets must be 0")
    if mining == "all":
        return AllTriplets(max_triplets)
    return SemiHardTriplets(margin) if mining == "semihard" else HardestTriplets()


class TripletRanking(RankingLoss):
    """DSRH's triplet hinge on squared code distances (Yao et al. 2016, Eq. 2); ``loss.ranking=triplet``.

    Consumes triplets from any miner: explicit triplets (the paper; the orthogonality penalty then runs over
    the query, positive and negative matrices, Eq. 6) or in-batch ones (all valid, semi-hard or batch-hard).

    Args:
        bits: code length (the margin is scaled by it with ``margin_scaling="per_bit"``).
        margin: hinge margin (paper: 1).
        margin_scaling: ``"constant"`` or ``"per_bit"`` (:func:`effective_margin`).
        average: ``"all"`` or ``"active"`` (:func:`triplet_ranking_loss`).
    """

    triplets = "any"

    def __init__(self, bits: int = 48, margin: float = 1.0, margin_scaling: str = "constant",
                 average: str = "all") -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        check_non_negative("margin", margin)
        check_choice("margin_scaling", margin_scaling, ("constant", "per_bit"))
        check_choice("average", average, AVERAGES)
        self.margin = effective_margin(margin, self.bits, margin_scaling)
        self.average = average

    def compute(self, out, labels, triplets, step) -> RankingResult:
        codes = out["codes"]
        if triplets.by_role:
            # One gather per role, shared by the hinge and the orthogonality penalty (Eq. 6's three matrices).
            a, p, n = triplets.indices()
            q, pos, neg = codes[a], codes[p], codes[n]
            return RankingResult(triplet_ranking_loss(q, pos, neg, self.margin, self.average), [q, pos, neg], codes,
                                 labels)
        loss = triplet_hinge(codes, triplets, self.margin, self.average)
        return RankingResult(loss, [codes], codes, labels, {"triplets_per_batch": triplets.count()})
