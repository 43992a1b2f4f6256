"""Stable Hamming ranking by bucketing, without a per-query sort.

Distances are small integers ``0..k``. Ranking by ``(distance, database index)``
means an item ``j`` at distance ``v`` sits at position

    pos(j) = #{i : d_i < v} + #{i <= j : d_i = v}            (1-based).

The first term comes from a per-query histogram over distances. The second
(the item's rank inside its bucket, in index order) is computed with chunked
histograms: the database axis is cut into chunks of ``C`` items, an exclusive
prefix over chunks gives the bucket counts before the item's chunk, and a
``C``-wide comparison inside the chunk finishes the count. Any per-item value
(1, relevance, graded relevance ...) can be prefix-summed the same way.
"""

from __future__ import annotations

import torch

__all__ = ["bucket_histogram", "within_bucket_prefix"]

CHUNK = 32


def bucket_histogram(dist: torch.Tensor, values: torch.Tensor | None, num_buckets: int) -> torch.Tensor:
    """Per-row sums of ``values`` (or counts) by distance bucket.

    Args:
        dist: ``(b, n)`` integer distances in ``0..num_buckets-1``.
        values: ``(b, n)`` numbers, or None to count items.
        num_buckets: ``V``.

    Returns:
        ``(b, V)`` tensor (int64 for counts, else the dtype of ``values``).
    """
    idx = dist.long()
    if values is None:
        src = torch.ones(1, 1, dtype=torch.int64, device=dist.device).expand_as(idx)
        out = torch.zeros(dist.shape[0], num_buckets, dtype=torch.int64, device=dist.device)
    else:
        src = values
        out = torch.zeros(dist.shape[0], num_buckets, dtype=values.dtype, device=dist.device)
    return out.scatter_add_(1, idx, src)


def within_bucket_prefix(
    dist: torch.Tensor,
    values: list[torch.Tensor | None],
    rows: torch.Tensor,
    cols: torch.Tensor,
    num_buckets: int,
    chunk: int = CHUNK,
    sub_batch: int = 1 << 21,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Inclusive prefix sums inside each item's distance bucket, in database-index order.

    For each selected item ``(rows[s], cols[s])`` with distance ``v`` and each value
    array ``x`` in ``values`` (None means all ones), returns
    ``sum(x[row, i] for i <= col if dist[row, i] == v)``.

    Args:
        dist: ``(b, n)`` integer distances in ``0..num_buckets-1`` (uint8 or int16).
        values: list of ``(b, n)`` int32 tensors or None.
        rows, cols: ``(S,)`` int64 indices of the selected items.
        num_buckets: ``V`` (distances are ``< V``).

    Returns:
        (prefixes, totals): ``prefixes[i]`` is ``(S,)`` int64 for ``values[i]``;
        ``totals[i]`` is the ``(b, V)`` int64 per-bucket sum of ``values[i]``.
    """
    b, n = dist.shape
    nc = (n + chunk - 1) // chunk
    pad = nc * chunk - n
    sentinel = num_buckets  # padding lands in an extra bucket nobody asks for
    dp = torch.nn.functional.pad(dist, (0, pad), value=sentinel) if pad else dist
    dp = dp.reshape(b, nc, chunk)
    idx = dp.long()
    vb = num_buckets + 1
    c_sel = torch.div(cols, chunk, rounding_mode="floor")
    o_sel = cols - c_sel * chunk
    d_sel = dist[rows, cols].long()
    ar = torch.arange(chunk, device=dist.device)
    tri = ar.view(1, -1) <= ar.view(-1, 1)  # tri[o, i] = i <= o

    prefixes, totals, vps, pref_tables = [], [], [], []
    for x in values:
        if x is None:
            xp = None
            src = torch.ones(1, 1, 1, dtype=torch.int32, device=dist.device).expand(b, nc, chunk)
        else:
            xp = torch.nn.functional.pad(x, (0, pad)) if pad else x
            xp = xp.reshape(b, nc, chunk).to(torch.int32)
            src = xp
        h = torch.zeros(b, nc, vb, dtype=torch.int32, device=dist.device).scatter_add_(2, idx, src)
        p = torch.cumsum(h, dim=1, dtype=torch.int32)
        totals.append(p[:, -1, :num_buckets].to(torch.int64))
        p -= h  # exclusive prefix over chunks
        pref_tables.append(p)
        vps.append(xp)
        prefixes.append(torch.empty(rows.numel(), dtype=torch.int64, device=dist.device))

    for s0 in range(0, rows.numel(), sub_batch):
        sl = slice(s0, s0 + sub_batch)
        r, c, o, v = rows[sl], c_sel[sl], o_sel[sl], d_sel[sl]
        eq = (dp[r, c] == v.view(-1, 1).to(dp.dtype)) & tri[o]
        for i, (p, xp) in enumerate(zip(pref_tables, vps)):
            if xp is None:
                within = eq.sum(1)
            else:
                within = (xp[r, c] * eq).sum(1)
            prefixes[i][sl] = p[r, c, v].to(torch.int64) + within
    return prefixes, totals
