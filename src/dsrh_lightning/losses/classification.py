"""Classification stream loss: softmax cross-entropy for class ids, sigmoid BCE for multi-hot."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["classification_loss"]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean classification loss, chosen from the label layout (never by hand).

    Args:
        logits: ``(b, c)``.
        labels: ``(b,)`` class ids -> softmax cross-entropy; ``(b, c)`` multi-hot ->
            sigmoid binary cross-entropy averaged over labels and images.
    """
    if labels.ndim == 1:
        return F.cross_entropy(logits.float(), labels.long())
    if labels.shape != logits.shape:
        raise ValueError(f"multi-hot labels {tuple(labels.shape)} do not match logits {tuple(logits.shape)}")
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())
