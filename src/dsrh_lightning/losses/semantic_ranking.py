"""Deep semantic ranking hashing of Zhao et al. (CVPR 2015): weighted multilevel ranking + bit balance."""

from __future__ import annotations

import torch

__all__ = ["hamming_surrogate", "weighted_ranking_loss", "balance_penalty"]


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
            :func:`~dsrh_lightning.data.sampling.mine_multilevel_triplets`).
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
