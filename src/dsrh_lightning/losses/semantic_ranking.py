"""Deep semantic ranking hashing of Zhao et al. (CVPR 2015): weighted multilevel ranking + bit balance."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .base import RankingLoss, RankingResult, check_choice, check_non_negative, check_positive_int
from .miners import MultilevelTriplets, Triplets
from .triplet import effective_margin

__all__ = ["WeightedRanking", "balance_penalty", "hamming_surrogate", "mined_weighted_ranking_loss",
           "multilevel_hinge", "weighted_ranking_loss"]


def hamming_surrogate(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise relaxed Hamming distance ``(k - h~_a . h~_b) / 2`` with ``h~ = 2h - 1``.

    Args:
        a, b: ``(t, k)`` codes in [0, 1]. Returns ``(t,)`` float32; equals the
        Hamming distance when the codes are binary.
    """
    k = a.shape[1]
    return (k - ((2 * a.float() - 1) * (2 * b.float() - 1)).sum(1)) / 2


def weighted_ranking_loss(codes: torch.Tensor, q: torch.Tensor, i: torch.Tensor, j: torch.Tensor,
                          weight: torch.Tensor, margin: float = 1.0) -> torch.Tensor:
    """``sum_t w_t * max(0, margin + d(q_t, i_t) - d(q_t, j_t)) / b``.

    Item ``i`` shares more labels with query ``q`` than item ``j`` does, so it
    should be closer by at least ``margin`` (in Hamming units).

    Args:
        codes: ``(b, k)`` batch codes in [0, 1].
        q, i, j: ``(t,)`` triplet positions in the batch (from
            :func:`~dsrh_lightning.losses.miners.mine_multilevel_triplets`).
        weight: ``(t,)`` triplet weights ``(2^r_i - 2^r_j) / Z_q``.

    Returns:
        Scalar float32 tensor: the weighted hinge summed over triplets, divided
        by the batch size (0 when there are no triplets).
    """
    if not (q.shape == i.shape == j.shape == weight.shape):
        raise ValueError(f"q, i, j, weight must have the same shape, got {q.shape}, {i.shape}, {j.shape}, "
                         f"{weight.shape}")
    if len(q) == 0:
        return codes.new_zeros((), dtype=torch.float32)
    hinge = torch.clamp(margin + hamming_surrogate(codes[q], codes[i]) - hamming_surrogate(codes[q], codes[j]), min=0)
    return (weight.float() * hinge).sum() / codes.shape[0]


def balance_penalty(codes: torch.Tensor) -> torch.Tensor:
    """``||mean over the batch of (2h - 1)||^2``: zero when every bit is on for half the batch on average.

    Args:
        codes: ``(b, k)`` codes in [0, 1]. Returns a scalar float32 tensor.
    """
    return (2 * codes.float() - 1).mean(0).pow(2).sum()


def mined_weighted_ranking_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float = 1.0,
                                max_triplets: int = 0, generator: Optional[torch.Generator] = None
                                ) -> Tuple[torch.Tensor, Union[torch.Tensor, float]]:
    """:func:`multilevel_hinge` over Zhao et al.'s in-batch multilevel triplets
    (:class:`~dsrh_lightning.losses.miners.MultilevelTriplets`).

    Equal to ``weighted_ranking_loss(codes, q, i, j, w, margin)`` with ``q, i, j, w =
    mine_multilevel_triplets(labels, max_triplets, generator)`` (same subset draw).

    Returns:
        ``(loss, count)``: the scalar float32 loss and the number of triplets used.
    """
    triplets = MultilevelTriplets(max_triplets)(codes, labels, generator)
    return multilevel_hinge(codes, triplets, margin), triplets.count()


def multilevel_hinge(codes: torch.Tensor, triplets: Triplets, margin: float = 1.0) -> torch.Tensor:
    """Zhao et al.'s weighted hinge ``sum w * max(0, margin + H[q, i] - H[q, j]) / b`` over weighted triplets,
    from one ``(b, b)`` Hamming-surrogate matrix ``H`` of ``codes (b, k)``: summed over the ``(b, b, b)`` mask
    (mask form) or read at the triples' entries of ``H`` (index form). Scalar float32."""
    if triplets.weight is None:
        raise ValueError("the multilevel hinge needs weighted triplets (miners.MultilevelTriplets)")
    b, k = codes.shape
    u = 2 * codes.float() - 1
    ham = (k - (u.unsqueeze(1) * u.unsqueeze(0)).sum(-1)) / 2  # (b, b) relaxed Hamming distances
    if triplets.mask is None:
        q, i, j = triplets.anchor, triplets.positive, triplets.negative
        hinge = torch.clamp(margin + ham[q, i] - ham[q, j], min=0)
        return (triplets.weight * hinge).sum() / b
    hinge = torch.clamp(margin + ham.unsqueeze(2) - ham.unsqueeze(1), min=0)  # [q, i, j]
    return (triplets.weight * hinge).sum() / b  # the weight is 0 outside the valid mask


class WeightedRanking(RankingLoss):
    """Zhao et al.'s weighted multilevel ranking hinge on the Hamming surrogate; ``loss.ranking=weighted``.

    Consumes weighted multilevel triplets mined inside plain batches (``data.sampling=random|balanced``).

    Args:
        bits: code length (the margin is scaled by it with ``margin_scaling="per_bit"``).
        margin: hinge margin in Hamming units.
        margin_scaling: ``"constant"`` or ``"per_bit"``.
    """

    triplets = "multilevel"

    def __init__(self, bits: int = 48, margin: float = 1.0, margin_scaling: str = "constant") -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        check_non_negative("margin", margin)
        check_choice("margin_scaling", margin_scaling, ("constant", "per_bit"))
        self.margin = effective_margin(margin, self.bits, margin_scaling)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        codes = out["codes"]
        return self.result(multilevel_hinge(codes, triplets, self.margin), codes, labels,
                           triplets_per_batch=triplets.count())
