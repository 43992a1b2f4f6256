"""Stable Hamming ranking by bucketing, without a per-query sort of the database.

Distances are small integers ``0..k``. Ranking by ``(distance, database index)``
puts an item ``j`` at distance ``v`` at position

    pos(j) = #{i : d_i < v} + #{i <= j : d_i = v}            (1-based).

The first term comes from a per-query histogram over distances. The second (the
item's rank inside its bucket, in index order) comes from chunked histograms: the
database axis is cut into chunks of ``C`` items, an exclusive prefix over chunks
gives the bucket counts before the item's chunk, and a ``C``-wide comparison
inside the chunk finishes the count.
"""

from __future__ import annotations

import torch

__all__ = ["bucket_histogram", "within_bucket_rank"]

CHUNK = 16


def bucket_histogram(idx: torch.Tensor, values: torch.Tensor | None, num_buckets: int) -> torch.Tensor:
    """Per-row sums of ``values`` (or counts when None) by distance bucket.

    Args:
        idx: ``(b, n)`` int64 distances in ``0..num_buckets-1``.
        values: ``(b, n)`` numbers, or None to count items.

    Returns:
        ``(b, num_buckets)`` (int64 for counts, else the dtype of ``values``).
    """
    if values is None:
        values = torch.ones(1, 1, dtype=torch.int64, device=idx.device).expand_as(idx)
    out = torch.zeros(idx.shape[0], num_buckets, dtype=values.dtype, device=idx.device)
    return out.scatter_add_(1, idx, values)


def within_bucket_rank(
    dist: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    num_buckets: int,
    chunk: int = CHUNK,
    sub_batch: int = 1 << 22,
) -> torch.Tensor:
    """Rank of selected items inside their distance bucket, in database-index order.

    Args:
        dist: ``(b, n)`` distances in ``0..num_buckets-1`` (uint8 or int16).
        rows, cols: ``(S,)`` int64 indices of the selected items.

    Returns:
        ``(S,)`` int64 ``#{i <= cols[s] : dist[rows[s], i] == dist[rows[s], cols[s]]}`` (>= 1).
    """
    b, n = dist.shape
    nc = (n + chunk - 1) // chunk
    pad = nc * chunk - n
    # padding goes to an extra bucket that no selected item asks for
    dp = torch.nn.functional.pad(dist, (0, pad), value=num_buckets) if pad else dist
    dp = dp.reshape(b, nc, chunk)
    table = torch.zeros(b, nc, num_buckets + 1, dtype=torch.int32, device=dist.device)
    table.scatter_add_(2, dp.long(), torch.ones(1, 1, 1, dtype=torch.int32, device=dist.device).expand(b, nc, chunk))
    prefix = torch.cumsum(table, dim=1, dtype=torch.int32)
    prefix -= table  # exclusive: counts in the chunks before
    del table
    ar = torch.arange(chunk, device=dist.device)
    tri = ar.view(1, -1) <= ar.view(-1, 1)  # tri[o, i] = i <= o
    out = torch.empty(rows.numel(), dtype=torch.int64, device=dist.device)
    for s0 in range(0, rows.numel(), sub_batch):
        r, j = rows[s0:s0 + sub_batch], cols[s0:s0 + sub_batch]
        c = torch.div(j, chunk, rounding_mode="floor")
        o = j - c * chunk
        v = dist[r, j]
        eq = (dp[r, c] == v.view(-1, 1)) & tri[o]
        out[s0:s0 + sub_batch] = prefix[r, c, v.long()].to(torch.int64) + eq.sum(1)
    return out
