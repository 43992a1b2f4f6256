"""The search page's numbers, as small numpy functions: one query's stable Hamming ranking over an index,
the tie groups of its top k, and leave-one-out average precision of index items used as queries."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import numpy as np

__all__ = ["hamming_row", "rank", "tie_groups", "relevant", "average_precision", "leave_one_out_ap"]


def hamming_row(q_bits: np.ndarray, db_bits: np.ndarray) -> np.ndarray:
    """Hamming distances ``(n,)`` int64 of one code ``(bits,)`` to every code ``(n, bits)`` (both {0,1})."""
    q, db = np.asarray(q_bits, dtype=np.uint8), np.asarray(db_bits, dtype=np.uint8)
    if q.ndim != 1 or db.ndim != 2 or db.shape[1] != q.shape[0]:
        raise ValueError(f"expected a (bits,) code and (n, bits) codes, got {q.shape} and {db.shape}")
    return (db != q[None]).sum(1).astype(np.int64)


def rank(dist: np.ndarray, exclude: Optional[int] = None) -> np.ndarray:
    """Item indices by distance, ties by index (the project's stable ranking); ``exclude`` left out."""
    order = np.argsort(np.asarray(dist), kind="stable")
    return order[order != exclude] if exclude is not None else order


def tie_groups(dist: np.ndarray, order: np.ndarray, k: int) -> List[Dict[str, int]]:
    """The tie groups that the top ``k`` of ``order`` touches: for each distance ``d`` shown, its ranks
    ``first..last`` (1-based, over the whole ranking: a group may run past k) and ``size``."""
    d_ranked = np.asarray(dist)[order]
    groups = []
    for d in dict.fromkeys(d_ranked[:k].tolist()):
        where = np.flatnonzero(d_ranked == d)
        groups.append({"distance": int(d), "first": int(where[0]) + 1, "last": int(where[-1]) + 1,
                       "size": int(len(where))})
    return groups


def relevant(q_label, labels: np.ndarray) -> np.ndarray:
    """``(n,)`` bool: same class (class ids ``(n,)``) or at least one shared label (multi-hot ``(n, c)``)."""
    labels = np.asarray(labels)
    if labels.ndim == 1:
        return labels == np.asarray(q_label)
    return (labels.astype(bool) & np.asarray(q_label).astype(bool)[None]).any(1)


def average_precision(rel_ranked: np.ndarray) -> float:
    """AP of a ranked relevance vector ``(n,)`` (0 when nothing is relevant)."""
    rel = np.asarray(rel_ranked, dtype=bool)
    if not rel.any():
        return 0.0
    hits = np.cumsum(rel)
    return float((hits[rel] / (np.flatnonzero(rel) + 1)).mean())


def leave_one_out_ap(bits: np.ndarray, labels: np.ndarray, positions: Sequence[int]) -> np.ndarray:
    """AP ``(len(positions),)`` of each index item at ``positions`` used as a query against all the other
    items (itself left out), under the stable ranking."""
    out = np.empty(len(positions), dtype=np.float64)
    for i, p in enumerate(positions):
        p = int(p)
        order = rank(hamming_row(bits[p], bits), exclude=p)
        out[i] = average_precision(relevant(labels[p], labels[order]))
    return out
