"""Exact search: the numba scan, torch and faiss against a brute-force reference, over codes files and
sharded indexes, with ties everywhere."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from dsrh_lightning.search import read_codes, write_codes, write_sharded
from dsrh_lightning.search.engines import (faiss_available, packed_words, search, search_faiss, search_numba,
                                           search_torch)


def brute_topk(q: np.ndarray, db: np.ndarray, k: int):
    """Reference: every distance by comparing bits one by one, then a sort by (distance, index) per query."""
    k = min(k, len(db))
    out_d = np.empty((len(q), k), dtype=np.int64)
    out_i = np.empty((len(q), k), dtype=np.int64)
    for r, row in enumerate(q):
        dist = [int((row != x).sum()) for x in db]
        order = sorted(range(len(db)), key=lambda j: (dist[j], j))[:k]
        out_d[r] = [dist[j] for j in order]
        out_i[r] = order
    return out_d, out_i


def clustered(rng, n: int, bits: int, centres: int = 4, flips: int = 2) -> np.ndarray:
    """Codes near a few centres: many items at every small distance, so ties decide most ranks."""
    c = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    x = c[rng.integers(0, centres, n)].copy()
    for row in x:
        row[rng.choice(bits, rng.integers(0, flips + 1), replace=False)] ^= 1
    return x


def test_packed_words_pad_with_zeros_and_keep_distances():
    rng = np.random.default_rng(0)
    for bits in (5, 48, 64, 70):
        a, b = rng.integers(0, 2, (2, bits), dtype=np.uint8)
        w = packed_words(np.packbits(np.stack([a, b]), axis=1))
        assert w.dtype == np.uint64 and w.shape == (2, -(-bits // 64))
        assert sum(bin(int(x)).count("1") for x in (w[0] ^ w[1])) == int((a != b).sum())


@pytest.mark.parametrize("bits", [6, 12, 48, 64, 100])
# (queries, threads): one part / several parts of the database, parts with a group of four queries and
# two more, many queries in groups of four (with one left over)
@pytest.mark.parametrize("nq,threads", [(1, 1), (1, 4), (3, 3), (6, 4), (40, 2), (17, 2)])
def test_numba_equals_brute_force_with_ties(bits, nq, threads):
    rng = np.random.default_rng(bits * 100 + nq)
    db = clustered(rng, 601, bits)
    q = np.concatenate([db[:1], clustered(rng, nq - 1, bits, flips=3)]) if nq > 1 else db[5:6]
    packed = np.packbits(db, axis=1)
    full_d, full_i = brute_topk(q, db, len(db))  # the top k is its first k columns
    for k in (1, 9, 150, 601, 700):
        d, i = search_numba(q, packed, k, threads=threads)
        np.testing.assert_array_equal(d, full_d[:, :k], err_msg=f"k={k}")
        np.testing.assert_array_equal(i, full_i[:, :k], err_msg=f"k={k}")


def test_numba_many_queries_over_several_blocks(monkeypatch):
    from dsrh_lightning.search import engines

    monkeypatch.setattr(engines, "SCAN_BLOCK", 64)  # 1,000 items: 16 blocks per query
    rng = np.random.default_rng(7)
    db = clustered(rng, 1000, 48, centres=3)
    q = clustered(rng, 30, 48, centres=3, flips=4)
    ref_d, ref_i = brute_topk(q, db, 25)
    d, i = search_numba(q, np.packbits(db, axis=1), 25, threads=2)  # 8 groups of four >= 2 x 2 threads
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(d, ref_d)


@pytest.mark.skipif(not faiss_available(), reason="faiss not installed")
def test_numba_distances_equal_faiss_flat_and_indices_are_a_valid_tie_order():
    import faiss

    rng = np.random.default_rng(1)
    bits, k = 64, 30
    db = clustered(rng, 3000, bits, centres=6, flips=3)
    q = clustered(rng, 20, bits, centres=6, flips=4)
    packed = np.packbits(db, axis=1)
    flat = faiss.IndexBinaryFlat(bits)
    flat.add(packed)
    fd, fi = flat.search(np.packbits(q, axis=1), k)
    d, i = search_numba(q, packed, k)
    np.testing.assert_array_equal(d, fd)  # faiss's k distances are exact; its tie order is its own
    for r in range(len(q)):
        kth = d[r, -1]
        assert set(i[r][d[r] < kth]) == set(fi[r][fd[r] < kth])
        tied = np.flatnonzero((db != q[r]).sum(1) == kth)  # every item at the k-th distance, by index
        np.testing.assert_array_equal(i[r][d[r] == kth], tied[:int((d[r] == kth).sum())])


def _engines():
    return ["numba", "torch"] + (["faiss"] if faiss_available() else [])


@pytest.mark.parametrize("engine", _engines())
@pytest.mark.parametrize("coalesce", [1, 50, 1 << 22])  # each shard alone, three shards a block, all in one
def test_sharded_search_equals_single_file_and_brute_force(tmp_path, engine, coalesce, monkeypatch):
    from dsrh_lightning.search import engines

    monkeypatch.setattr(engines, "COALESCE_ROWS", coalesce)
    rng = np.random.default_rng(11)
    bits = 12
    db = clustered(rng, 230, bits, centres=3, flips=2)  # tie groups span shard boundaries
    q = np.concatenate([db[[0, 100, 229]], clustered(rng, 5, bits, centres=3, flips=3)])
    ids = [f"x#{j}" for j in range(len(db))]
    write_codes(tmp_path / "one.npz", db, ids)
    sharded = write_sharded(tmp_path / "ix", db, ids, shard_size=23)
    full_d, full_i = brute_topk(q, db, len(db))
    for k in (1, 10, 40, 230, 500):
        ref_d, ref_i = full_d[:, :k], full_i[:, :k]
        for index in (read_codes(tmp_path / "one.npz"), sharded):
            d, i, used = search(q, index, k, engine)
            assert used == engine
            np.testing.assert_array_equal(i, ref_i, err_msg=f"{engine} k={k} {type(index).__name__}")
            np.testing.assert_array_equal(d, ref_d)
    got_ids, _ = sharded.take(ref_i[:, :10])
    assert got_ids.tolist() == np.asarray(ids)[ref_i[:, :10]].tolist()


def test_auto_engine_is_numba_and_bad_inputs_are_refused(tmp_path):
    db = np.random.default_rng(2).integers(0, 2, (50, 16), dtype=np.uint8)
    write_codes(tmp_path / "a.npz", db, [str(j) for j in range(50)])
    ix = read_codes(tmp_path / "a.npz")
    d, i, used = search(db[:2], ix, 3)
    assert used == "numba" and i[:, 0].tolist() == [0, 1] and d[:, 0].tolist() == [0, 0]
    with pytest.raises(ValueError, match="engine must be one of"):
        search(db[:2], ix, 3, "annoy")
    with pytest.raises(ValueError, match="bit widths differ"):
        search(db[:2, :12], ix, 3)
    with pytest.raises(ValueError, match=r"\{0,1\}"):
        search(db[:2] * 2, ix, 3)
    for k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            search(db[:2], ix, k)
    with pytest.raises(ValueError, match="bit widths differ"):
        search_numba(db[:2], np.packbits(db[:, :8], axis=1), 3)


def test_coalesce_joins_consecutive_blocks_only():
    from dsrh_lightning.search.engines import _coalesce

    a, b, c, d = (np.full((n, 1), n, np.uint8) for n in (3, 4, 5, 6))
    got = [(o, p[:, 0].tolist()) for o, p in _coalesce([(0, a), (3, b), (7, c), (20, d)], 8)]
    assert got == [(0, [3] * 3 + [4] * 4 + [5] * 5), (20, [6] * 6)]
    got = [(o, len(p)) for o, p in _coalesce([(0, a), (3, b), (10, c)], 100)]
    assert got == [(0, 7), (10, 5)]  # a gap: what came before is passed on alone


def test_memory_grows_with_the_index_not_with_index_times_queries(tmp_path, monkeypatch):
    """2,000 queries x 40,000 codes: a distance matrix would be 80 M entries; the search holds the
    codes, the queries' top k and one shard's words."""
    rng = np.random.default_rng(3)
    nq, nd, bits = 2000, 40_000, 64
    db = rng.integers(0, 2, (nd, bits), dtype=np.uint8)
    sharded = write_sharded(tmp_path / "ix", db, [str(j) for j in range(nd)], shard_size=10_000)
    from dsrh_lightning.search import engines

    monkeypatch.setattr(engines, "COALESCE_ROWS", 10_000)  # one shard a block, as for a large index
    q = rng.integers(0, 2, (nq, bits), dtype=np.uint8)
    search(q[:1], sharded, 5)  # compile outside the measurement
    tracemalloc.start()
    d, i, _ = search(q, sharded, 5)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 8_000_000, f"peak {peak} bytes"  # a uint8 distance matrix alone: 80,000,000
    ref_d, ref_i = brute_topk(q[:3], db, 5)
    np.testing.assert_array_equal(i[:3], ref_i)
    np.testing.assert_array_equal(d[:3], ref_d)


def test_torch_engine_unchanged_for_callers():
    rng = np.random.default_rng(4)
    db = clustered(rng, 300, 20, centres=3)
    ref_d, ref_i = brute_topk(db[:4], db, 12)
    d, i = search_torch(db[:4], db, 12, db_chunk=37)
    np.testing.assert_array_equal(i, ref_i)
    if faiss_available():
        d, i = search_faiss(db[:4], np.packbits(db, axis=1), 20, 12, multihash=False)
        np.testing.assert_array_equal(i, ref_i)


def test_keep_codes_reads_the_shards_once(tmp_path):
    from dsrh_lightning.search import CodesFileError, open_codes

    rng = np.random.default_rng(12)
    db = clustered(rng, 90, 48, centres=3)
    q = db[[0, 45, 89]]
    write_sharded(tmp_path / "ix", db, [str(j) for j in range(90)], shard_size=20)
    ref_d, ref_i = brute_topk(q, db, 30)
    kept, plain = open_codes(tmp_path / "ix", keep_codes=True), open_codes(tmp_path / "ix")
    for index in (kept, plain):
        d, i, _ = search(q, index, 30)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(d, ref_d)
    (tmp_path / "ix" / "shard-00002.npz").unlink()  # the codes are in memory now, or must be read again
    for _ in range(2):
        d, i, _ = search(q, kept, 30)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(d, ref_d)
    with pytest.raises(CodesFileError, match="shard-00002.npz"):
        search(q, plain, 30)


def test_tie_counting_without_numba_keeps_its_arrays_near_16_mib(monkeypatch):
    """The default chunk counts every array a chunk makes (byte tables and distances), not the byte table
    alone: the int64 distances were 8x the 16 MiB table for 1-byte codes."""
    import tracemalloc

    from dsrh_lightning.search import engines

    monkeypatch.setattr(engines, "HAVE_NUMBA", False)
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2, (64, 8), dtype=np.uint8)
    db = rng.integers(0, 2, (300_000, 8), dtype=np.uint8)
    qp, dp = np.packbits(q, axis=1), np.packbits(db, axis=1)
    tracemalloc.start()
    try:
        counts = engines._block_counts(qp, None, dp, 8)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB while counting, expected near 16 MiB"
    for r in range(len(q)):  # a loop reference: the distance of every item, counted
        ref = np.bincount((db != q[r]).sum(1), minlength=9)
        np.testing.assert_array_equal(counts[r], ref)
