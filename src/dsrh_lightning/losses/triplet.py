"""Triplet ranking hinge of DSRH (Yao et al. 2016, Eq. 2)."""

from __future__ import annotations

import torch

__all__ = ["triplet_ranking_loss", "effective_margin"]


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


def triplet_ranking_loss(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         margin: float = 1.0) -> torch.Tensor:
    """Mean over triplets of ``max(0, margin - ||q - n||^2 + ||q - p||^2)``.

    Args:
        query, positive, negative: ``(t, k)`` relaxed codes (sigmoid outputs in [0, 1]).
        margin: hinge margin (paper: 1).

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
    return torch.clamp(margin - d_neg + d_pos, min=0).mean()
