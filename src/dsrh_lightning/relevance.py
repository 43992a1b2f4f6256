"""Label relevance in one place.

Every component that needs to know whether two items are relevant to each other
(triplet samplers, in-batch miners, losses and retrieval metrics) goes through
this module, so single-label and multi-label data are handled the same way
everywhere.

Labels come in two layouts:

* single-label: a 1-D integer tensor of class ids, shape ``(n,)``;
* multi-label: a 2-D 0/1 tensor (multi-hot), shape ``(n, c)``.

Three relevance definitions are provided:

* ``binary`` relevance (:func:`relevance_matrix`): same class for single-label
  data; *share at least one label* for multi-label data;
* ``multilevel`` relevance (:func:`shared_label_counts`): the number of shared
  labels ``r`` (0 or 1 for single-label data), as used by Zhao et al. (CVPR 2015)
  for NDCG, ACG and weighted mAP.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "is_multilabel",
    "validate_labels",
    "relevance_matrix",
    "shared_label_counts",
]


def is_multilabel(labels: torch.Tensor | np.ndarray) -> bool:
    """True when ``labels`` is a 2-D multi-hot matrix, False for 1-D class ids."""
    return labels.ndim == 2


def validate_labels(labels: torch.Tensor | np.ndarray, name: str = "labels") -> None:
    """Raise ``ValueError`` naming ``name`` unless labels are 1-D ints or 2-D 0/1.

    A 2-D matrix with a single column is rejected: it is ambiguous (one class id
    per row, or a one-concept multi-hot matrix) and should be given as 1-D.
    """
    arr = labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if arr.ndim == 1:
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.equal(np.mod(arr, 1), 0)):
                raise ValueError(f"{name}: 1-D labels must be integer class ids, got dtype {arr.dtype}")
        if arr.size and arr.min() < 0:
            raise ValueError(f"{name}: class ids must be >= 0, found {arr.min()}")
        return
    if arr.ndim == 2:
        if arr.shape[1] < 2:
            raise ValueError(
                f"{name}: multi-hot labels need at least 2 columns, got shape {arr.shape}; "
                "pass single-label data as a 1-D vector of class ids"
            )
        bad = ~np.isin(arr, (0, 1))
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            raise ValueError(f"{name}: multi-hot labels must be 0/1; row {row} has {arr[row].tolist()}")
        return
    raise ValueError(f"{name}: expected shape (n,) class ids or (n, c) multi-hot, got shape {arr.shape}")


def _as_float_multihot(labels: torch.Tensor) -> torch.Tensor:
    return labels.to(torch.float32)


def shared_label_counts(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """Number of labels each query shares with each database item.

    Args:
        query_labels: ``(nq,)`` class ids or ``(nq, c)`` multi-hot.
        db_labels: same layout as ``query_labels``, ``(nd,)`` or ``(nd, c)``.

    Returns:
        ``(nq, nd)`` int64 tensor ``r``; for single-label data ``r`` is 1 for the
        same class and 0 otherwise.
    """
    _check_same_layout(query_labels, db_labels)
    if not is_multilabel(query_labels):
        return (query_labels.view(-1, 1) == db_labels.view(1, -1)).to(torch.int64)
    counts = _as_float_multihot(query_labels) @ _as_float_multihot(db_labels).T
    return counts.round().to(torch.int64)


def relevance_matrix(query_labels: torch.Tensor, db_labels: torch.Tensor) -> torch.Tensor:
    """Binary relevance: same class (single-label) or at least one shared label (multi-label).

    Args:
        query_labels: ``(nq,)`` class ids or ``(nq, c)`` multi-hot.
        db_labels: same layout, ``(nd,)`` or ``(nd, c)``.

    Returns:
        ``(nq, nd)`` bool tensor.
    """
    _check_same_layout(query_labels, db_labels)
    if not is_multilabel(query_labels):
        return query_labels.view(-1, 1) == db_labels.view(1, -1)
    return (_as_float_multihot(query_labels) @ _as_float_multihot(db_labels).T) > 0.5


def _check_same_layout(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.ndim != b.ndim:
        raise ValueError(
            f"query labels have {a.ndim} dims but database labels have {b.ndim}; "
            "both must be class ids (n,) or both multi-hot (n, c)"
        )
    if a.ndim == 2 and a.shape[1] != b.shape[1]:
        raise ValueError(
            f"multi-hot label widths differ: queries have {a.shape[1]} columns, database has {b.shape[1]}"
        )
