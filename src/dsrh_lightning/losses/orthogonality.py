"""Orthogonality penalty of DSRH (Yao et al. 2016, Eq. 6)."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["orthogonality_penalty"]


def orthogonality_penalty(matrices: Sequence[torch.Tensor], norm: str = "none") -> torch.Tensor:
    """``(1/len) * sum_H ||(1/m) H~^T H~ - I||_F^2`` with ``H~ = 2H - 1``.

    Pushes the bits of each code matrix towards being uncorrelated and balanced
    (for binary codes the diagonal of ``(1/m) H~^T H~`` is 1, so only the
    off-diagonal bit correlations count).

    Args:
        matrices: code matrices ``(m, k)`` in [0, 1] (the paper: queries,
            positives and negatives of a batch, so ``len == 3``).
        norm: ``"none"`` (paper), ``"bits"`` (divide by k) or ``"bits2"`` (divide by
            k^2). The Frobenius sum has k^2 terms, so without normalisation the
            penalty's scale grows with the code length.

    Returns:
        Scalar float32 tensor (always computed in float32, also under autocast).
    """
    if not matrices:
        raise ValueError("orthogonality_penalty needs at least one code matrix")
    total = None
    with torch.autocast(device_type=matrices[0].device.type, enabled=False):
        for h in matrices:
            if h.ndim != 2 or h.shape[0] == 0:
                raise ValueError(f"expected non-empty (m, k) code matrices, got {tuple(h.shape)}")
            m, k = h.shape
            ht = 2.0 * h.float() - 1.0
            gram = ht.T @ ht / m
            term = (gram - torch.eye(k, device=h.device)).pow(2).sum()
            total = term if total is None else total + term
        k = matrices[0].shape[1]
        scale = {"none": 1.0, "bits": 1.0 / k, "bits2": 1.0 / (k * k)}.get(norm)
        if scale is None:
            raise ValueError(f"loss.orth_norm={norm!r}: expected 'none', 'bits' or 'bits2'")
        return total * scale / len(matrices)
