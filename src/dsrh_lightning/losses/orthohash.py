"""OrthoHash: one loss, cosine similarity to orthogonal target codes.

Hoe, Ng, Zhang, Chan, Song & Xiang, "One Loss for All: Deep Hashing with a Single Cosine Similarity based
Learning Objective", NeurIPS 2021.

Every class ``j`` gets a fixed target code ``c_j`` in ``{-1, +1}^k`` drawn i.i.d. Bernoulli(1/2) (nearly
orthogonal for large ``k``). The hash layer's output ``v`` is scored by its cosine similarity to each code and
trained with a cosine-margin softmax cross-entropy (the paper's CosFace-style margin ``m`` and scale
``s``), plus the cosine quantisation term:

    logit_j = s * (cos(v, c_j) - m * [j is a label of the image])
    L = CE(logit, y) + lambda * mean_i (1 - cos(v_i, sgn(v_i)))

For multi-hot labels (the multi-label form the authors' code uses by default, ``label_smoothing``): the margin
is subtracted at every label and the cross-entropy's target is the labels divided by their count.

Here ``v`` is the hash layer's pre-activation (``code_logits``); the codebook is a buffer of the loss
(``codebook``, drawn from ``codebook_seed``, saved with checkpoints). Codes binarise at ``v > 0``.

Conventions against the authors' implementation (kamwoh/orthohash, ``functions/loss/orthohash.py`` with
``CosSim`` of ``models/alexnet.py``), equal on fixed inputs otherwise (``tests/test_field_losses.py``):

* the quantisation target is ``+1`` for ``v > 0``, ``-1`` otherwise (the reference's ``sign`` gives 0 at 0);
* the codebook is drawn with a seeded generator here (the reference draws it from the global seed);
* the classification weight ``ce`` of the reference is 1 (scale the whole term with ``loss.ranking_weight``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RankingLoss, RankingResult, check_non_negative, check_positive_int

__all__ = ["OrthoHash", "bernoulli_codebook", "orthohash_loss"]


def bernoulli_codebook(num_classes: int, bits: int, seed: int = 0) -> torch.Tensor:
    """``(num_classes, bits)`` float32 target codes, each entry ``+-1`` with probability 1/2 (seeded)."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 2, (num_classes, bits), generator=g).float() * 2 - 1


def orthohash_loss(v: torch.Tensor, labels: torch.Tensor, codebook: torch.Tensor, scale: float = 8.0,
                   cos_margin: float = 0.2, quant_weight: float = 0.0) -> torch.Tensor:
    """OrthoHash's cosine-margin cross-entropy against ``codebook`` + ``quant_weight`` * cosine quantisation.

    Args:
        v: ``(b, k)`` hash-layer outputs.
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        codebook: ``(c, k)`` target codes (rows need not be normalised).
        scale: ``s``; cos_margin: ``m``; quant_weight: ``lambda``.

    Returns:
        Scalar float32 tensor.
    """
    if v.ndim != 2 or v.shape[1] != codebook.shape[1]:
        raise ValueError(f"codes {tuple(v.shape)} and codebook {tuple(codebook.shape)} disagree on bits")
    v = v.float()
    cos = F.normalize(v, dim=1) @ F.normalize(codebook.float(), dim=1).T  # (b, c)
    if labels.ndim == 1:
        onehot = F.one_hot(labels.long(), codebook.shape[0]).float()
        ce = F.cross_entropy(scale * (cos - cos_margin * onehot), labels.long())
    else:
        target = labels.float()
        logp = F.log_softmax(scale * (cos - cos_margin * target), dim=1)
        ce = -(target / target.sum(1, keepdim=True).clamp(min=1) * logp).sum(1).mean()
    if quant_weight == 0:
        return ce
    b = torch.where(v > 0, 1.0, -1.0).detach()
    return ce + quant_weight * (1 - F.cosine_similarity(v, b, dim=1)).mean()


class OrthoHash(RankingLoss):
    """OrthoHash's cosine-margin cross-entropy against fixed Bernoulli codes; ``loss.ranking=orthohash``.

    Args:
        bits: code length; num_classes: classes (or labels), one target code each.
        scale: ``s`` (8 in the paper); cos_margin: ``m`` (0.2).
        quant_weight: ``lambda`` of the cosine quantisation term (``loss.quant_weight``; the reference's default 0).
        codebook_seed: seed of the target codes.
    """

    consumes = "code_logits"

    def __init__(self, bits: int, num_classes: int, scale: float = 8.0, cos_margin: float = 0.2,
                 quant_weight: float = 0.0, codebook_seed: int = 0) -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.scale = check_non_negative("scale", scale)
        if self.scale == 0:
            raise ValueError("scale=0: must be > 0")
        self.cos_margin = check_non_negative("cos_margin", cos_margin)
        self.quant_weight = check_non_negative("quant_weight", quant_weight)
        self.register_buffer("codebook", bernoulli_codebook(self.num_classes, self.bits, codebook_seed))

    def compute(self, out, labels, triplets, step) -> RankingResult:
        loss = orthohash_loss(out["code_logits"], labels, self.codebook, self.scale, self.cos_margin,
                              self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)
