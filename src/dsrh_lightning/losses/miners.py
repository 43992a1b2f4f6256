"""Miners: which (anchor, positive, negative) triples of a batch a triplet loss uses.

A miner is called as ``miner(codes, labels, generator=None)`` and returns :class:`Triplets`, positions
into the batch's rows; losses consume them and never choose triplets themselves (the shape of
pytorch-metric-learning's miners). Relevance always comes from :mod:`dsrh_lightning.relevance`.

* :class:`ExplicitTriplets`: a batch of explicit triplets sampled from the whole training set
  (``data.sampling=triplets``, :mod:`dsrh_lightning.data.sampling`) arrives as rows
  (query, positive, negative) of each triplet; this miner names those rows.
* :class:`AllTriplets`: every valid in-batch triplet, as a ``(b, b, b)`` mask (evaluated from one
  ``(b, b)`` distance matrix: no per-triplet gather, no host synchronisation) or, when
  ``max_triplets`` caps them, as index lists drawn with ``torch.randperm`` on the generator.
* :class:`SemiHardTriplets` (Schroff et al. 2015) and :class:`HardestTriplets` (Hermans et al.
  2017's batch-hard), chosen on the current codes without gradient.
* :class:`MultilevelTriplets`: Zhao et al. (2015)'s multilevel triplets with their weights.

The functions below (:func:`triplet_mask`, :func:`mine_all_triplets`, ...) are the same answers as
plain tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..relevance import relevance_matrix, shared_label_counts

__all__ = ["MINERS", "AllTriplets", "ExplicitTriplets", "HardestTriplets", "MultilevelTriplets", "SemiHardTriplets",
           "Triplets", "ideal_dcg", "kept_triplets", "mine_all_triplets", "mine_multilevel_triplets",
           "multilevel_mask", "pair_masks", "squared_distances", "subsample", "triplet_mask"]


def pair_masks(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(positive, negative)``, two ``(b, b)`` bool masks: ``positive[a, p] = rel(a, p) and a != p``,
    ``negative[a, n] = not rel(a, n)``.

    Args:
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot labels of the batch.
    """
    with torch.no_grad():
        rel = relevance_matrix(labels, labels)
        eye = torch.eye(rel.shape[0], dtype=torch.bool, device=rel.device)
        return rel & ~eye, ~rel


def triplet_mask(labels: torch.Tensor) -> torch.Tensor:
    """``(b, b, b)`` bool: ``valid[a, p, n] = rel(a, p) and a != p and not rel(a, n)``.

    Args:
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot labels of the batch.
    """
    pos, neg = pair_masks(labels)
    return pos.unsqueeze(2) & neg.unsqueeze(1)


def ideal_dcg(r: torch.Tensor) -> torch.Tensor:
    """Ideal DCG of each row of relevance levels ``r (q, n)``: gains ``2^r - 1`` sorted descending,
    discount ``1/log2(pos + 1)``; returns ``(q,)`` float32."""
    gains = torch.pow(2.0, r.float()) - 1.0
    gains = gains.sort(dim=1, descending=True).values
    disc = 1.0 / torch.log2(torch.arange(2, r.shape[1] + 2, device=r.device, dtype=torch.float32))
    return (gains * disc).sum(1)


def multilevel_mask(labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Zhao et al.'s multilevel triplets as ``(valid, weight)``, both ``(b, b, b)`` indexed ``[q, i, j]``.

    ``valid[q, i, j]``: ``r(q, i) > r(q, j)`` with ``i, j != q`` (``r`` = shared labels,
    :func:`~dsrh_lightning.relevance.shared_label_counts`). ``weight[q, i, j] = (2^r_qi - 2^r_qj) / Z_q``
    with ``Z_q`` the ideal DCG of the query's list over the other batch items (0 where not valid).
    """
    with torch.no_grad():
        r = shared_label_counts(labels, labels)
        eye = torch.eye(r.shape[0], dtype=torch.bool, device=r.device)
        r_other = r.masked_fill(eye, -1)  # the query itself never takes part
        valid = (r_other.unsqueeze(2) > r_other.unsqueeze(1)) & (r_other.unsqueeze(1) >= 0)
        z = ideal_dcg(r.masked_fill(eye, 0))
        gain = torch.pow(2.0, r.float())
        weight = (gain.unsqueeze(2) - gain.unsqueeze(1)) / z[:, None, None]
        # A query without any relevant item has Z_q = 0 and no valid triplet: its 0/0 weights must not
        # reach a loss (NaN * 0 is NaN, also in the backward pass of a masked product).
        return valid, torch.where(valid, weight, 0.0)


def subsample(count: int, max_triplets: int, generator: Optional[torch.Generator],
              device: torch.device) -> Optional[torch.Tensor]:
    """Positions kept out of ``count`` mined triplets: a uniform random subset of ``max_triplets``
    (``torch.randperm`` on ``generator``, on the CPU), or None when all are kept."""
    if max_triplets and count > max_triplets:
        return torch.randperm(count, generator=generator, device="cpu")[:max_triplets].to(device)
    return None


def kept_triplets(valid: torch.Tensor, max_triplets: int, generator: Optional[torch.Generator]
                  ) -> Optional[Tuple[torch.Tensor, ...]]:
    """The index triples of the ``(b, b, b)`` mask ``valid`` that :func:`subsample` keeps when
    ``max_triplets`` caps them (the same draw as the ``mine_*`` functions), else None: all are used,
    and the caller can work on the whole mask without a host synchronisation."""
    if not max_triplets:
        return None
    keep = subsample(int(valid.sum()), max_triplets, generator, valid.device)
    if keep is None:
        return None
    return tuple(t[keep] for t in valid.nonzero(as_tuple=True))


def mine_all_triplets(labels: torch.Tensor, max_triplets: int = 0,
                      generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All valid (anchor, positive, negative) index triplets inside a batch.

    Args:
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot labels of the batch.
        max_triplets: keep a uniformly random subset of at most this many (0 = all).
        generator: torch generator for the subset draw.

    Returns:
        Three ``(t,)`` int64 tensors on ``labels.device``: anchor, positive and
        negative positions in the batch, with ``rel(a, p)``, ``a != p`` and
        ``not rel(a, n)``.
    """
    with torch.no_grad():
        a, p, n = triplet_mask(labels).nonzero(as_tuple=True)
        keep = subsample(len(a), max_triplets, generator, a.device)
        if keep is not None:
            a, p, n = a[keep], p[keep], n[keep]
        return a, p, n


def mine_multilevel_triplets(labels: torch.Tensor, max_triplets: int = 0,
                             generator: Optional[torch.Generator] = None):
    """All in-batch triplets ``(q, i, j)`` with ``r(q, i) > r(q, j)`` and their weights (Zhao et al. 2015).

    ``r`` is the number of labels shared with the query (:func:`shared_label_counts`).
    The weight is ``(2^r_i - 2^r_j) / Z_q`` with ``Z_q`` the ideal DCG of the query's
    list over the other batch items.

    Args:
        labels: ``(b,)`` class ids or ``(b, c)`` multi-hot.
        max_triplets, generator: as :func:`mine_all_triplets`.

    Returns:
        ``q, i, j`` (``(t,)`` int64 positions in the batch, ``i, j != q``) and
        ``weight`` (``(t,)`` float32, > 0).
    """
    with torch.no_grad():
        valid, weight = multilevel_mask(labels)
        q, i, j = valid.nonzero(as_tuple=True)
        keep = subsample(len(q), max_triplets, generator, q.device)
        if keep is not None:
            q, i, j = q[keep], i[keep], j[keep]
        return q, i, j, weight[q, i, j]


def squared_distances(codes: torch.Tensor) -> torch.Tensor:
    """``(b, b)`` float32 squared Euclidean distances between the rows of ``codes (b, k)``."""
    x = codes.float()
    return (x.unsqueeze(1) - x.unsqueeze(0)).pow(2).sum(-1)


@dataclass
class Triplets:
    """Triplets of a batch as positions into its ``b`` rows, in one of two forms.

    Attributes:
        anchor, positive, negative: ``(t,)`` int64 positions (index form), or None.
        valid: ``(t,)`` bool, which index triples count (batch-hard: anchors with both a positive
            and a negative); None = all.
        mask: ``(b, b, b)`` bool ``[a, p, n]`` (mask form: every marked triple counts), or None.
        weight: Zhao et al.'s weights, ``(b, b, b)`` in mask form or ``(t,)`` in index form; None for
            unweighted triplets.
        by_role: every row is the query, the positive or the negative of exactly one triplet
            (explicit triplets); DSRH's orthogonality penalty then runs over the three role matrices.
    """

    anchor: Optional[torch.Tensor] = None
    positive: Optional[torch.Tensor] = None
    negative: Optional[torch.Tensor] = None
    valid: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    weight: Optional[torch.Tensor] = None
    by_role: bool = False

    def __post_init__(self) -> None:
        has_index = self.anchor is not None
        if has_index == (self.mask is not None):
            raise ValueError("Triplets: give either anchor/positive/negative or mask")
        if has_index and not (self.anchor.shape == self.positive.shape == self.negative.shape):
            raise ValueError(f"Triplets: anchor/positive/negative shapes differ: {tuple(self.anchor.shape)}, "
                             f"{tuple(self.positive.shape)}, {tuple(self.negative.shape)}")
        if self.mask is not None and (self.mask.ndim != 3 or len(set(self.mask.shape)) != 1):
            raise ValueError(f"Triplets: mask must be (b, b, b), got {tuple(self.mask.shape)}")

    def indices(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, p, n)``, three ``(t,)`` int64 tensors of the triples that count (the mask's ``nonzero()``
        in row-major order; index triples with ``valid`` False left out)."""
        if self.mask is not None:
            return self.mask.nonzero(as_tuple=True)
        if self.valid is None:
            return self.anchor, self.positive, self.negative
        return self.anchor[self.valid], self.positive[self.valid], self.negative[self.valid]

    def count(self):
        """The number of triples that count (a tensor, or a float for plain index lists)."""
        if self.mask is not None:
            return self.mask.sum().float()
        if self.valid is not None:
            return self.valid.sum().float()
        return float(len(self.anchor))


class ExplicitTriplets:
    """The rows of an explicit-triplet batch: rows ``3i, 3i + 1, 3i + 2`` are the query, positive and
    negative of triplet ``i`` (``data.sampling=triplets``; the labels are not read)."""

    def __call__(self, codes: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 generator: Optional[torch.Generator] = None) -> Triplets:
        if len(codes) % 3:
            raise ValueError(f"explicit triplets need 3 rows per triplet, got {len(codes)} rows")
        a = torch.arange(0, len(codes), 3, device=codes.device)
        return Triplets(a, a + 1, a + 2, by_role=True)


class _CappedMiner:
    """A miner that keeps a uniformly random subset of at most ``max_triplets`` of its triplets (0 = all)."""

    def __init__(self, max_triplets: int = 0) -> None:
        if int(max_triplets) < 0:
            raise ValueError(f"max_triplets={max_triplets}: must be >= 0 (0 = all)")
        self.max_triplets = int(max_triplets)


class AllTriplets(_CappedMiner):
    """Every valid in-batch triplet (``rel(a, p)``, ``a != p``, ``not rel(a, n)``): the ``(b, b, b)`` mask, or
    a uniformly random subset of at most ``max_triplets`` as index lists (0 = all)."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Triplets:
        valid = triplet_mask(labels)
        kept = kept_triplets(valid, self.max_triplets, generator)
        return Triplets(mask=valid) if kept is None else Triplets(*kept)


class SemiHardTriplets:
    """The valid triplets whose negative is farther from the anchor than the positive but within the margin,
    ``D[a, p] < D[a, n] < D[a, p] + margin`` on squared code distances (Schroff et al. 2015), chosen without
    gradient. ``margin`` is the triplet loss's (effective) margin."""

    def __init__(self, margin: float = 1.0) -> None:
        if not float(margin) >= 0:
            raise ValueError(f"margin={margin}: must be >= 0")
        self.margin = float(margin)

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Triplets:
        with torch.no_grad():
            dist = squared_distances(codes)
            d_an, d_ap = dist.unsqueeze(1), dist.unsqueeze(2)
            valid = triplet_mask(labels) & (d_an > d_ap) & (d_an < d_ap + self.margin)
        return Triplets(mask=valid)


class HardestTriplets:
    """One triplet per anchor: its farthest positive and nearest negative in squared code distance
    (Hermans et al. 2017's batch-hard), chosen without gradient; anchors without a positive or a
    negative are marked not ``valid``."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Triplets:
        with torch.no_grad():
            dist = squared_distances(codes)
            pos, neg = pair_masks(labels)
            p = torch.where(pos, dist, float("-inf")).argmax(1)
            n = torch.where(neg, dist, float("inf")).argmin(1)
            anchors = pos.any(1) & neg.any(1)
            a = torch.arange(len(dist), device=dist.device)
        return Triplets(a, p, n, valid=anchors)


class MultilevelTriplets(_CappedMiner):
    """Zhao et al. (2015)'s in-batch triplets ``(q, i, j)`` with ``r(q, i) > r(q, j)`` and their weights
    (:func:`multilevel_mask`); a random subset of at most ``max_triplets`` as index lists (0 = all)."""

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> Triplets:
        valid, weight = multilevel_mask(labels)
        kept = kept_triplets(valid, self.max_triplets, generator)
        if kept is None:
            return Triplets(mask=valid, weight=weight)
        q, i, j = kept
        return Triplets(q, i, j, weight=weight[q, i, j])


#: In-batch miners by ``loss.triplet_mining`` name.
MINERS: Dict[str, type] = {"all": AllTriplets, "semihard": SemiHardTriplets, "hard": HardestTriplets}
