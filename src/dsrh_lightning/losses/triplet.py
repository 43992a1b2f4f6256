"""Triplet ranking hinge of DSRH (Yao et al. 2016, Eq. 2)."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from .base import RankingLoss, RankingResult
from .miners import kept_triplets, pair_masks, triplet_mask

__all__ = ["MININGS", "TripletRanking", "effective_margin", "mined_triplet_loss", "triplet_ranking_loss"]


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


AVERAGES = ("all", "active")
# Which in-batch triplets the hinge sees: every valid one (the paper), the semi-hard ones (negative farther
# than the positive but within the margin, Schroff et al. 2015) or each anchor's hardest positive and negative
# (Hermans et al. 2017).
MININGS = ("all", "semihard", "hard")


def _average(hinge: torch.Tensor, valid: Optional[torch.Tensor], average: str) -> torch.Tensor:
    """Mean of ``hinge`` over the ``valid`` entries (all entries when None): over every one (``all``)
    or over those with a positive hinge (``active``); 0 when there are none."""
    if average not in AVERAGES:
        raise ValueError(f"loss.triplet_average={average!r}: expected one of {AVERAGES}")
    if valid is None and average == "all":
        return hinge.mean()
    if valid is not None:
        hinge = torch.where(valid, hinge, 0.0)
    count = (hinge > 0).sum() if average == "active" else valid.sum()
    return hinge.sum() / count.clamp(min=1)


def triplet_ranking_loss(query: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                         margin: float = 1.0, average: str = "all") -> torch.Tensor:
    """Mean over triplets of ``max(0, margin - ||q - n||^2 + ||q - p||^2)``.

    Args:
        query, positive, negative: ``(t, k)`` relaxed codes (sigmoid outputs in [0, 1]).
        margin: hinge margin (paper: 1).
        average: ``all`` divides the summed hinge by the number of triplets (the paper's mean);
            ``active`` by the number of triplets whose hinge is positive (Hermans et al. 2017's
            "batch all"), so the step does not shrink as more triplets are satisfied.

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
    return _average(torch.clamp(margin - d_neg + d_pos, min=0), None, average)


def mined_triplet_loss(codes: torch.Tensor, labels: torch.Tensor, margin: float = 1.0, max_triplets: int = 0,
                       generator: Optional[torch.Generator] = None, average: str = "all", mining: str = "all"
                       ) -> Tuple[torch.Tensor, Union[torch.Tensor, float]]:
    """:func:`triplet_ranking_loss` over the in-batch triplets ``mining`` selects, from one ``(b, b)`` distance matrix.

    With ``mining="all"`` equal to ``triplet_ranking_loss(codes[a], codes[p], codes[n], margin, average)`` with
    ``a, p, n = mine_all_triplets(labels, max_triplets, generator)`` (same subset draw), without
    gathering a ``(t, k)`` code matrix per triplet: the hinge ``margin - D[a, n] + D[a, p]`` is
    evaluated on the ``(b, b, b)`` grid and averaged over the valid mask (no host synchronisation),
    or, when ``max_triplets`` subsamples, read at the kept triplets' entries of ``D``.

    ``mining="semihard"`` keeps the valid triplets whose negative is farther from the anchor than the
    positive but within the margin (``D[a, p] < D[a, n] < D[a, p] + margin``, Schroff et al. 2015, chosen on
    the current codes without gradient; with ``average="active"`` the upper bound changes nothing, as the
    hinge is 0 beyond it); ``mining="hard"`` uses
    one triplet per anchor, its farthest positive and nearest negative (anchors without either are left
    out), and ``average`` then runs over anchors. Neither subsamples (``max_triplets`` must be 0).

    Args:
        codes: ``(b, k)`` relaxed codes in [0, 1].
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        margin, max_triplets, generator, average: as :func:`triplet_ranking_loss` and
            :func:`~dsrh_lightning.losses.miners.mine_all_triplets`.
        mining: one of :data:`MININGS`.

    Returns:
        ``(loss, count)``: the scalar float32 loss (0 without triplets) and the number of triplets used.
    """
    if mining not in MININGS:
        raise ValueError(f"loss.triplet_mining={mining!r}: expected one of {MININGS}")
    if mining != "all" and max_triplets:
        raise ValueError(f"loss.triplet_mining={mining!r} does not subsample: data.max_triplets must be 0")
    x = codes.float()
    dist = (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)  # (b, b) squared distances
    if mining == "hard":
        pos, neg = pair_masks(labels)
        hardest_pos = torch.where(pos, dist, float("-inf")).amax(1)
        nearest_neg = torch.where(neg, dist, float("inf")).amin(1)
        anchors = pos.any(1) & neg.any(1)
        hinge = torch.clamp(margin - nearest_neg + hardest_pos, min=0)
        return _average(hinge, anchors, average), anchors.sum().float()  # _average masks the left-out anchors
    valid = triplet_mask(labels)
    if mining == "semihard":
        with torch.no_grad():
            d_an, d_ap = dist.unsqueeze(1), dist.unsqueeze(2)
            valid = valid & (d_an > d_ap) & (d_an < d_ap + margin)  # D[a, p] < D[a, n] < D[a, p] + margin
    kept = kept_triplets(valid, max_triplets, generator)
    if kept is not None:
        a, p, n = kept
        return _average(torch.clamp(margin - dist[a, n] + dist[a, p], min=0), None, average), float(len(a))
    hinge = torch.clamp(margin - dist.unsqueeze(1) + dist.unsqueeze(2), min=0)  # [a, p, n]
    return _average(hinge, valid, average), valid.sum().float()


class TripletRanking(RankingLoss):
    """DSRH's triplet hinge on squared code distances (Yao et al. 2016, Eq. 2); ``loss.ranking=triplet``.

    Explicit triplets (``data.sampling=triplets``) or the in-batch triplets ``loss.triplet_mining`` selects
    (``balanced`` / ``random``; all valid ones capped by ``data.max_triplets``, semi-hard or batch-hard).
    """

    def __init__(self, cfg, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.margin = effective_margin(cfg.loss.margin, self.bits, cfg.loss.margin_scaling)
        self.max_triplets = int(cfg.data.max_triplets)
        self.average = cfg.loss.triplet_average
        self.mining = cfg.loss.triplet_mining

    def forward(self, out, labels, *, explicit, step, generator=None) -> RankingResult:
        if explicit:
            # Rows are (query, positive, negative) of each triplet.
            codes = out["codes"].view(-1, 3, self.bits)
            q, p, n = codes[:, 0], codes[:, 1], codes[:, 2]
            return RankingResult(triplet_ranking_loss(q, p, n, self.margin, self.average), [q, p, n], out["codes"],
                                 self.flat_labels(labels, explicit))
        codes = out["codes"]
        loss, count = mined_triplet_loss(codes, labels, self.margin, self.max_triplets, generator,
                                         self.average, self.mining)
        return RankingResult(loss, [codes], codes, labels, {"triplets_per_batch": count})
