"""Peer deep-hashing losses, as pure functions of relaxed codes and labels / triplet indices.

They replace DSRH's ranking term (``loss.ranking=dpsh|dtsh|hashnet|csq``, the classes at the
end of this file, registered in :mod:`.registry`) and run
through the same network, data and evaluation. Codes are relaxed to ``u``: the hash layer's
pre-activation ``z`` itself for DPSH and DTSH (their papers' linear output, kept near +-1 by the
quantisation term; ``relax="sigmoid"`` gives ``u = 2h - 1`` of the sigmoid codes ``h`` instead),
``u = 2h - 1`` in (-1, 1) for CSQ, ``u = tanh(beta * z)`` for HashNet. All binarise to ``u > 0``,
i.e. ``z > 0`` or ``h > 0.5``, as the evaluation does.

* DPSH (Li, Wang & Kang, IJCAI 2016): pairwise likelihood
  ``mean_{i != j} [log(1 + e^theta_ij) - s_ij theta_ij]``, ``theta_ij = u_i.u_j / 2``,
  plus ``eta * mean_i ||u_i - b_i||^2`` with ``b = sign(u)``.
* DTSH (Wang, Shi & Kitani, ACCV 2016): triplet likelihood
  ``mean_t log(1 + e^{-(theta_ap - theta_an - alpha)})`` plus the same quantisation term.

  The quantisation term sums over the ``k`` bits (the papers' ``||b - u||^2``) and averages over images, the
  likelihood averages over pairs / triplets. swuxyj/DeepHash-pytorch averages the quantisation term over bits
  too, so its weight is ``k`` times smaller than the same ``quant_weight`` here (0.1 there is ``0.1 / k`` here).
* HashNet (Cao et al., ICCV 2017): weighted pairwise cross-entropy on
  ``alpha <h_i, h_j>`` (``alpha = 10 / bits``), similar and dissimilar pairs
  re-weighted to equal total weight, ``h = tanh(beta z)`` with the continuation
  ``beta_t = (1 + gamma t)^power``.
* CSQ (Yuan et al., CVPR 2020): hash centres (rows of a Hadamard matrix), binary
  cross-entropy between ``(u + 1)/2`` and the centre of each image's class, plus
  ``lambda * mean (|u| - 1)^2``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..relevance import relevance_matrix
from .base import RankingLoss, RankingResult, check_choice, check_non_negative, check_positive_int, pairwise_inputs

__all__ = ["CSQ", "DPSH", "DTSH", "HashNet", "csq_centers", "csq_loss", "csq_targets", "dpsh_loss", "dtsh_loss", "hadamard",
           "hashnet_loss", "hashnet_scale", "quantization_penalty"]

def quantization_penalty(u: torch.Tensor) -> torch.Tensor:
    """``mean_i ||u_i - b_i||^2`` with ``b = +1 if u >= 0 else -1``; ``u (b, k)`` -> scalar."""
    u = u.float()
    b = torch.where(u >= 0, 1.0, -1.0).detach()
    return (u - b).pow(2).sum(1).mean()


def _off_diagonal(b: int, device) -> torch.Tensor:
    return ~torch.eye(b, dtype=torch.bool, device=device)


def dpsh_loss(u: torch.Tensor, labels: torch.Tensor, quant_weight: float = 0.1) -> torch.Tensor:
    """DPSH pairwise negative log-likelihood over all ordered pairs ``i != j`` of the batch.

    Args:
        u: ``(b, k)`` relaxed codes (real-valued; +-1 is what the quantisation term pulls them to).
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot; ``s_ij`` = relevance.
        quant_weight: ``eta`` of the quantisation term.

    Returns:
        Scalar float32 tensor.
    """
    u, s, mask = pairwise_inputs("dpsh_loss", u, labels)
    theta = 0.5 * u @ u.T
    nll = F.softplus(theta) - s * theta
    return nll[mask].mean() + quant_weight * quantization_penalty(u)


def dtsh_loss(u: torch.Tensor, a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, alpha: float = 5.0,
              quant_weight: float = 0.1) -> torch.Tensor:
    """DTSH triplet negative log-likelihood ``mean_t softplus(-(theta_ap - theta_an - alpha))``.

    Args:
        u: ``(b, k)`` relaxed codes (real-valued; +-1 is what the quantisation term pulls them to).
        a, p, n: ``(t,)`` anchor / positive / negative positions in the batch.
        alpha: margin on the inner-product difference.
        quant_weight: weight of the quantisation term (over all ``b`` codes).

    Returns:
        Scalar float32 tensor (only the quantisation term when ``t == 0``).
    """
    if not (a.shape == p.shape == n.shape):
        raise ValueError(f"a, p, n must have the same shape, got {a.shape}, {p.shape}, {n.shape}")
    u = u.float()
    quant = quant_weight * quantization_penalty(u)
    if len(a) == 0:
        return quant
    theta_ap = 0.5 * (u[a] * u[p]).sum(1)
    theta_an = 0.5 * (u[a] * u[n]).sum(1)
    return F.softplus(-(theta_ap - theta_an - alpha)).mean() + quant


def hashnet_scale(step: int, gamma: float = 0.005, power: float = 0.5, init: float = 1.0) -> float:
    """Continuation of the tanh scale: ``beta = init * (1 + gamma * step)^power`` (HashNet's schedule)."""
    return float(init * (1.0 + gamma * max(int(step), 0)) ** power)


def hashnet_loss(h: torch.Tensor, labels: torch.Tensor, alpha: Optional[float] = None) -> torch.Tensor:
    """HashNet's weighted pairwise cross-entropy over all ordered pairs ``i != j``.

    ``l_ij = w_ij (log(1 + e^{alpha <h_i,h_j>}) - s_ij alpha <h_i,h_j>)`` with
    ``w = |S| / |S_1|`` for similar and ``|S| / |S_0|`` for dissimilar pairs.

    Args:
        h: ``(b, k)`` codes ``tanh(beta z)`` in (-1, 1).
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        alpha: sigmoid scale (None = ``10 / k``, the paper's choice).

    Returns:
        Scalar float32 tensor.
    """
    if h.ndim != 2 or h.shape[0] < 2:
        raise ValueError(f"hashnet_loss needs (b >= 2, k) codes, got {tuple(h.shape)}")
    h = h.float()
    alpha = 10.0 / h.shape[1] if alpha is None else alpha
    mask = _off_diagonal(len(h), h.device)
    s = relevance_matrix(labels, labels)[mask].float()
    ip = (alpha * h @ h.T)[mask]
    nll = F.softplus(ip) - s * ip
    total, n_sim = float(len(s)), float(s.sum())
    n_dis = total - n_sim
    w = torch.where(s > 0, total / max(n_sim, 1.0), total / max(n_dis, 1.0))
    return (w * nll).mean()


def hadamard(order: int) -> np.ndarray:
    """Sylvester Hadamard matrix ``(order, order)`` of +-1; ``order`` must be a power of two."""
    if order < 1 or order & (order - 1):
        raise ValueError(f"Sylvester Hadamard matrices exist for powers of two, not {order}")
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < order:
        h = np.block([[h, h], [h, -h]])
    return h


def csq_centers(num_classes: int, bits: int) -> torch.Tensor:
    """``(num_classes, bits)`` +-1 hash centres from the rows of ``[H; -H]`` (CSQ).

    ``H`` is the Sylvester Hadamard matrix of order ``2^ceil(log2 bits)``; for a
    power-of-two ``bits`` the centres of the first ``bits`` classes are exactly
    ``bits/2`` apart. Otherwise its first ``bits`` columns are kept (pairwise
    distances then lie in ``[bits/2 - (order-bits)/2, bits/2 + (order-bits)/2]``).
    Raises when there are more classes than the ``2 * order`` rows.
    """
    order = 1 << max(0, math.ceil(math.log2(bits)))
    h = hadamard(order)
    rows = np.concatenate([h, -h])[:, :bits]
    if num_classes > len(rows):
        raise ValueError(f"CSQ: {num_classes} classes but only {len(rows)} Hadamard centres for {bits} bits")
    return torch.as_tensor(rows[:num_classes], dtype=torch.float32)


def csq_targets(labels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The centre of each image: ``centers[y]`` for class ids, the sign of the sum of its labels'
    centres for multi-hot labels (ties -> +1). ``(b, k)`` +-1."""
    centers = centers.to(labels.device)
    if labels.ndim == 1:
        return centers[labels.long()]
    summed = labels.float() @ centers
    return torch.where(summed >= 0, 1.0, -1.0)


def csq_loss(u: torch.Tensor, labels: torch.Tensor, centers: torch.Tensor, quant_weight: float = 1e-4) -> torch.Tensor:
    """CSQ: ``BCE((u + 1)/2, (c + 1)/2)`` averaged over bits and images, ``+ lambda * mean (|u| - 1)^2``.

    Args:
        u: ``(b, k)`` relaxed codes in [-1, 1].
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        centers: ``(num_classes, k)`` +-1 hash centres (:func:`csq_centers`).
    """
    if u.ndim != 2 or u.shape[1] != centers.shape[1]:
        raise ValueError(f"codes {tuple(u.shape)} and centres {tuple(centers.shape)} disagree on bits")
    u = u.float()
    target = (csq_targets(labels, centers) + 1) / 2
    prob = ((u + 1) / 2).clamp(1e-7, 1 - 1e-7)
    center = F.binary_cross_entropy(prob, target)
    return center + quant_weight * (u.abs() - 1).pow(2).mean()


RELAXATIONS = ("linear", "sigmoid")


class _LinearRelaxation(RankingLoss):
    """A loss on ``u``: the hash layer's pre-activation (``relax="linear"``, what it consumes and mines on) or
    ``2h - 1`` of the sigmoid codes (``relax="sigmoid"``). With the sigmoid form the quantisation term drives
    ``|u|`` to 1, where the sigmoid's gradient vanishes: a batch whose codes agree stays there (DTSH collapsed
    to one code end to end, docs/RESULTS.md)."""

    def __init__(self, relax: str) -> None:
        super().__init__()
        check_choice("relax", relax, RELAXATIONS)
        self.relax = relax
        self.consumes = "code_logits" if relax == "linear" else "codes"

    def relaxed(self, out) -> torch.Tensor:
        """``(b, k)`` ``u`` of the network output ``out``."""
        return out["code_logits"] if self.relax == "linear" else 2 * out["codes"] - 1


class DPSH(_LinearRelaxation):
    """DPSH pairwise likelihood + quantisation over all rows of the batch; ``loss.ranking=dpsh``.

    Args:
        quant_weight: ``eta`` of the quantisation term.
        relax: ``"linear"`` (``u`` = the hash layer's pre-activation, as in the paper) or ``"sigmoid"``
            (``u = 2h - 1``).
    """

    def __init__(self, quant_weight: float = 0.1, relax: str = "linear") -> None:
        super().__init__(relax)
        self.quant_weight = check_non_negative("quant_weight", quant_weight)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        loss = dpsh_loss(self.relaxed(out), labels, self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)


class DTSH(_LinearRelaxation):
    """DTSH triplet likelihood + quantisation; ``loss.ranking=dtsh``. Consumes triplets from any miner
    (explicit triplets, or every valid / semi-hard / batch-hard in-batch triplet).

    Args:
        alpha: margin on the inner-product difference (``loss.dtsh_margin``).
        quant_weight: weight of the quantisation term (over all rows of the batch).
        relax: ``"linear"`` (``u`` = the hash layer's pre-activation, as in the paper; semi-hard and hardest
            miners then mine on it) or ``"sigmoid"`` (``u = 2h - 1``).
    """

    triplets = "any"

    def __init__(self, alpha: float = 5.0, quant_weight: float = 0.1, relax: str = "linear") -> None:
        super().__init__(relax)
        self.alpha = float(alpha)
        if self.alpha != self.alpha or abs(self.alpha) == float("inf"):
            raise ValueError(f"alpha={alpha!r}: must be a finite number")
        self.quant_weight = check_non_negative("quant_weight", quant_weight)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        a, p, n = triplets.indices()
        loss = dtsh_loss(self.relaxed(out), a, p, n, self.alpha, self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)


class HashNet(RankingLoss):
    """HashNet's weighted pairwise cross-entropy on ``tanh(beta * z)``; ``loss.ranking=hashnet``.

    Owns the continuation ``beta_t = (1 + gamma * t)^power`` and reports it as ``hashnet_beta``.

    Args:
        alpha: sigmoid scale of the inner product (None = ``10 / bits``, the paper's).
        gamma, power: the continuation's schedule.
    """

    consumes = "code_logits"

    def __init__(self, alpha: Optional[float] = None, gamma: float = 0.005, power: float = 0.5) -> None:
        super().__init__()
        self.alpha = None if alpha is None else check_non_negative("alpha", alpha)
        self.gamma = check_non_negative("gamma", gamma)
        self.power = float(power)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        beta = hashnet_scale(step, self.gamma, self.power)
        loss = hashnet_loss(torch.tanh(beta * out["code_logits"].float()), labels, self.alpha)
        return self.result(loss, self.relaxed_codes(out), labels, hashnet_beta=beta)


class CSQ(RankingLoss):
    """CSQ: Hadamard hash centres (a buffer, ``centers``) + quantisation; ``loss.ranking=csq``.

    Args:
        bits: code length; num_classes: number of classes (one centre each).
        quant_weight: ``lambda`` of the quantisation term.
    """

    def __init__(self, bits: int, num_classes: int, quant_weight: float = 1e-4) -> None:
        super().__init__()
        self.bits = check_positive_int("bits", bits)
        self.num_classes = check_positive_int("num_classes", num_classes)
        self.quant_weight = check_non_negative("quant_weight", quant_weight)
        self.register_buffer("centers", csq_centers(self.num_classes, self.bits))

    def compute(self, out, labels, triplets, step) -> RankingResult:
        codes = out["codes"]
        return self.result(csq_loss(2 * codes - 1, labels, self.centers, self.quant_weight), codes, labels)
