"""DSH: contrastive loss on real-valued codes with margin 2k.

Liu, Wang, Shan & Chen, "Deep Supervised Hashing for Fast Image Retrieval", CVPR 2016.

For a pair of images with codes ``b_i, b_j`` in ``R^k`` and ``y_ij = 0`` when they are similar, 1 when not
(the paper's relaxed objective with its regulariser):

    L_ij = 1/2 (1 - y_ij) ||b_i - b_j||^2 + 1/2 y_ij max(m - ||b_i - b_j||^2, 0)
           + alpha (|| |b_i| - 1 ||_1 + || |b_j| - 1 ||_1),      m = 2k

Here the pairs are every ordered pair ``i != j`` of the batch (the paper forms its pairs inside each
mini-batch), the contrastive term is averaged over them and the regulariser over images (summed over bits):
``mean_{i != j} L^c_ij + alpha' * mean_i || |b_i| - 1 ||_1``. The paper sums over its ``b (b - 1) / 2``
unordered pairs, each image in ``b - 1`` of them; divided by that count its objective is this one with
``alpha' = 2 alpha`` (its ``alpha = 0.01`` is ``quant_weight = 0.02`` here). ``b`` is the hash
layer's pre-activation (``code_logits``), binarised at 0; similarity is :mod:`dsrh_lightning.relevance`
(a shared label for multi-hot labels).

Conventions against the reference implementation usually compared with (swuxyj/DeepHash-pytorch,
``DSH.py``), equal on fixed inputs otherwise (``tests/test_field_losses.py``):

* the reference pairs each batch code with a bank of every training image's latest code (its own included),
  and averages over that ``b x N`` grid; with the bank holding only the batch this is this module's
  contrastive term times ``(b - 1) / b`` (self-pairs add 0);
* its regulariser is ``alpha * mean |1 - sgn(u)|`` (mean over bits, not the paper's ``|| |b| - 1 ||_1``).
"""

from __future__ import annotations

import torch

from .base import RankingLoss, RankingResult, check_non_negative, check_positive_int, pairwise_inputs

__all__ = ["DSH", "dsh_loss"]


def dsh_loss(u: torch.Tensor, labels: torch.Tensor, margin: float, quant_weight: float = 0.02) -> torch.Tensor:
    """DSH's contrastive loss over the ordered pairs ``i != j`` of the batch + ``quant_weight`` * regulariser.

    Args:
        u: ``(b, k)`` real-valued codes, ``b >= 2``.
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        margin: ``m`` on squared distances (the paper: ``2k``).
        quant_weight: ``alpha'`` (see the module docstring).

    Returns:
        Scalar float32 tensor.
    """
    u, sim, off = pairwise_inputs("dsh_loss", u, labels)
    dist = (u.unsqueeze(1) - u.unsqueeze(0)).pow(2).sum(-1)
    pair = 0.5 * sim * dist + 0.5 * (1 - sim) * torch.clamp(margin - dist, min=0)
    return pair[off].mean() + quant_weight * (u.abs() - 1).abs().sum(1).mean()


class DSH(RankingLoss):
    """DSH's contrastive loss with margin ``margin_per_bit * k`` + its regulariser; ``loss.ranking=dsh``.

    Args:
        bits: code length.
        margin_per_bit: the margin over ``k`` (the paper's ``m = 2k``).
        quant_weight: ``alpha'`` of the regulariser (``loss.quant_weight``; 0.02 is the paper's ``alpha = 0.01``).
    """

    consumes = "code_logits"

    def __init__(self, bits: int, margin_per_bit: float = 2.0, quant_weight: float = 0.02) -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        self.margin = check_non_negative("margin_per_bit", margin_per_bit) * self.bits
        self.quant_weight = check_non_negative("quant_weight", quant_weight)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        loss = dsh_loss(out["code_logits"], labels, self.margin, self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)
