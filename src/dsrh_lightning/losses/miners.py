"""In-batch miners: which (anchor, positive, negative) triples of a batch a ranking loss uses.

Relevance always comes from :mod:`dsrh_lightning.relevance`. Two forms of the same answer:

* masks: a ``(b, b, b)`` boolean tensor ``valid[a, p, n]`` (and, for Zhao et al.'s multilevel
  ranking, a ``(b, b, b)`` weight tensor). The losses evaluate their hinge over the whole mask
  from one ``(b, b)`` distance matrix: no per-triplet gather, no host synchronisation.
* index lists (:func:`mine_all_triplets`, :func:`mine_multilevel_triplets`): the mask's
  ``nonzero()`` in row-major order, optionally a uniformly random subset of at most
  ``max_triplets`` (``data.max_triplets``), drawn with ``torch.randperm`` on the given generator.

Explicit triplets sampled from the whole training set (``data.sampling=triplets``) stay in
:mod:`dsrh_lightning.data.sampling`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..relevance import relevance_matrix, shared_label_counts

__all__ = ["ideal_dcg", "kept_triplets", "mine_all_triplets", "mine_multilevel_triplets", "multilevel_mask",
           "pair_masks", "subsample", "triplet_mask"]


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
