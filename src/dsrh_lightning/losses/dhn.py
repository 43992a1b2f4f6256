"""DHN: pairwise cross-entropy plus a quantisation loss.

Zhu, Long, Wang & Cao, "Deep Hashing Network for Efficient Similarity Retrieval", AAAI 2016.

DHN's hash layer has a tanh activation, ``z = tanh(u)``; similar pairs should have a large inner product
(the paper's pairwise likelihood and its smooth, log-cosh quantisation loss):

    L = sum_{i,j} [log(1 + exp(<z_i, z_j>)) - s_ij <z_i, z_j>] + lambda sum_i sum_k log cosh(|z_ik| - 1)

Here the pairwise term is averaged over the ordered pairs ``i != j`` of the batch and the quantisation term
over images (summed over bits), ``mean_{i != j} [...] + lambda * mean_i sum_k log cosh(|z_ik| - 1)``, with the
inner product optionally scaled (``ip_scale``, 1 = the paper). The paper sums over its ``b (b - 1)`` pairs and
``b`` images; divided by the pair count its ``lambda`` is ``quant_weight * (b - 1)`` here. ``u`` is the hash
layer's pre-activation
(``code_logits``), binarised at 0; similarity is :mod:`dsrh_lightning.relevance` (a shared label for multi-hot).

Conventions against the reference implementation usually compared with (swuxyj/DeepHash-pytorch, ``DHN.py``),
equal on fixed inputs otherwise (``tests/test_field_losses.py``):

* the reference has no tanh (its hash layer is linear) and scales the inner product by 1/2
  (``ip_scale=0.5`` here, applied to its codes directly);
* it pairs each batch code with a bank of every training image's latest code, its own included, averaged over
  that ``b x N`` grid: with the bank holding only the batch, this module's pairwise term times ``(b - 1) / b``
  plus the self-pairs' ``mean_i [log(1 + exp(<z_i, z_i>)) - <z_i, z_i>] / b``;
* its quantisation term is ``lambda * mean | |u| - 1 |`` (the L1 form log cosh smooths, averaged over bits).

The authors' TensorFlow code (thulab/DeepHash, ``model/dhn/dhn.py``) differs again: it keeps the tanh, scales
the inner product by ``alpha`` and clips it to [-15, 15], re-weights similar and dissimilar pairs to equal
total weight (as HashNet does) and uses ``mean (|z| - 1)^2`` as its quantisation term.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import RankingLoss, RankingResult, check_non_negative, pairwise_inputs

__all__ = ["DHN", "dhn_loss"]


def _log_cosh(x: torch.Tensor) -> torch.Tensor:
    """``log(cosh(x))`` without overflow: ``|x| + log1p(exp(-2|x|)) - log 2``."""
    a = x.abs()
    return a + torch.log1p(torch.exp(-2 * a)) - torch.log(torch.tensor(2.0, device=x.device))


def dhn_loss(z: torch.Tensor, labels: torch.Tensor, ip_scale: float = 1.0, quant_weight: float = 0.1) -> torch.Tensor:
    """DHN's pairwise cross-entropy over ordered pairs ``i != j`` + ``quant_weight`` * log-cosh quantisation.

    Args:
        z: ``(b, k)`` codes (``tanh`` of the hash layer in DHN), ``b >= 2``.
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        ip_scale: factor on the inner product ``<z_i, z_j>``.
        quant_weight: ``lambda``.

    Returns:
        Scalar float32 tensor.
    """
    z, sim, off = pairwise_inputs("dhn_loss", z, labels)
    ip = ip_scale * z @ z.T
    nll = F.softplus(ip) - sim * ip
    return nll[off].mean() + quant_weight * _log_cosh(z.abs() - 1).sum(1).mean()


class DHN(RankingLoss):
    """DHN's pairwise cross-entropy + log-cosh quantisation on ``tanh(code_logits)``; ``loss.ranking=dhn``.

    Args:
        ip_scale: factor on the inner product (1 = the paper).
        quant_weight: ``lambda`` of the quantisation term (``loss.quant_weight``).
    """

    consumes = "code_logits"

    def __init__(self, ip_scale: float = 1.0, quant_weight: float = 0.1) -> None:
        super().__init__()
        self.ip_scale = check_non_negative("ip_scale", ip_scale)
        self.quant_weight = check_non_negative("quant_weight", quant_weight)

    def compute(self, out, labels, triplets, step) -> RankingResult:
        loss = dhn_loss(torch.tanh(out["code_logits"].float()), labels, self.ip_scale, self.quant_weight)
        return self.result(loss, self.relaxed_codes(out), labels)
