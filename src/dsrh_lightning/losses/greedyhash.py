"""GreedyHash: sign in the forward pass, straight-through gradient.

Su, Zhang, Han & Tian, "Greedy Hash: Towards Fast Optimization for Accurate Hash Coding in CNN", NeurIPS 2018.

The paper's supervised objective (the greedy sign step with a classification loss on the codes):

    b = sgn(u) in the forward pass, dL/du = dL/db in the backward pass (the "greedy" step),
    L = CE(W^T b, y) + alpha * || |u| - 1 ||_3^3

with ``u`` the hash layer's output, ``W`` a bias-free linear classifier on the binary codes and the cubic
penalty pulling ``|u|`` to 1.

Here ``u`` is the hash layer's pre-activation (``code_logits``); the loss owns ``W`` (``fc``, trained with the
heads) and applies the sign itself, so the network needs no extra output: the straight-through sign and the
classifier on the codes are part of the loss object. Codes binarise at ``u > 0`` as the evaluation does
(``sigmoid(u) > 0.5``).

Conventions against the reference implementation usually compared with (swuxyj/DeepHash-pytorch,
``GreedyHash.py``), equal on fixed inputs otherwise (``tests/test_field_losses.py``):

* sign: ``+1`` for ``u > 0`` and ``-1`` otherwise; the reference's ``torch.sign`` gives 0 at exactly 0;
* penalty: ``alpha * mean over images and bits of | |u| - 1 |^3`` (the reference's), i.e. the paper's
  cube norm divided by ``b * k``;
* multi-hot labels: sigmoid binary cross-entropy on ``W^T b`` (the paper and the reference are single-label;
  this multi-label form is ours).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import RankingLoss, RankingResult, check_non_negative, check_positive_int
from .classification import classification_loss

__all__ = ["GreedyHash", "greedy_sign", "greedyhash_loss"]


def greedy_sign(u: torch.Tensor) -> torch.Tensor:
    """``+1`` where ``u > 0``, ``-1`` elsewhere, with the identity as its gradient (straight through).

    Exact in the forward pass: ``sign + (u - u.detach())`` adds an exact 0.
    """
    b = torch.where(u > 0, 1.0, -1.0).to(u.dtype)
    return b.detach() + (u - u.detach())


def greedyhash_loss(u: torch.Tensor, labels: torch.Tensor, fc: nn.Module, quant_weight: float = 0.1) -> torch.Tensor:
    """``classification_loss(fc(greedy_sign(u)), labels) + quant_weight * mean | |u| - 1 |^3``.

    Args:
        u: ``(b, k)`` hash-layer outputs (real valued).
        labels: ``(b,)`` class ids (softmax cross-entropy) or ``(b, c)`` multi-hot (sigmoid BCE).
        fc: bias-free linear layer ``k -> c`` on the binary codes.
        quant_weight: ``alpha`` of the cubic penalty.

    Returns:
        Scalar float32 tensor.
    """
    if u.ndim != 2:
        raise ValueError(f"greedyhash_loss needs (b, k) codes, got {tuple(u.shape)}")
    u = u.float()
    cls = classification_loss(fc(greedy_sign(u)), labels)
    return cls + quant_weight * (u.abs() - 1).abs().pow(3).mean()


class GreedyHash(RankingLoss):
    """GreedyHash's classification loss on sign codes + cubic penalty; ``loss.ranking=greedyhash``.

    Args:
        bits: code length; num_classes: classes (or labels) of the classifier on the codes.
        quant_weight: ``alpha`` of the cubic penalty (``loss.quant_weight``; 0.1 in the reference's CIFAR setup).
    """

    consumes = "code_logits"

    def __init__(self, bits: int, num_classes: int, quant_weight: float = 0.1) -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.quant_weight = check_non_negative("quant_weight", quant_weight)
        self.fc = nn.Linear(self.bits, self.num_classes, bias=False)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        loss = greedyhash_loss(out["code_logits"], labels, self.fc, self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)
