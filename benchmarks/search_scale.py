"""Exact Hamming search at scale: queries/s of the numba scan next to faiss ``IndexBinaryFlat`` and the
memory-bandwidth bound of one scan of the database.

    python -m benchmarks.search_scale                                       # tiny: checks it runs, not a timing
    python -m benchmarks.search_scale --sizes 1000000 10000000 --bits 48 64 [--json out.json]

For each database size and code length: uniformly random codes (``--seed``), ``--single`` queries
searched one at a time and a batch of ``--batch`` queries searched at once, top ``--k``.

* ``ours``: :func:`dsrh_lightning.search.engines.search_numba` (the default engine of ``dsrh search``),
  exact with ties ordered by database index, on codes padded to 64-bit words once (as faiss copies
  them once into its index).
* ``faiss``: ``IndexBinaryFlat.search`` (its k-NN search; its order inside a tie group is its own).
* ``scan bound``: the time to read the packed database once (``n x ceil(bits/8)`` bytes), measured
  by a sum over those bytes (the faster of one thread and all threads). A single query must read
  the whole database, so ``1 / scan`` queries/s is its bound, and ``time per query / scan`` (the
  last ratio) is how far a search is from it. A batch is scanned block by block, every query of a
  block while it is in cache, so the database is read once for the whole batch: its time per
  query can fall below one scan (a ratio under 1), and is then bound by the popcounts, not memory.

Both engines use ``--threads`` threads (default: every core). Before anything is reported, the
script asserts: our distances equal faiss's for every query, the items strictly closer than the
k-th distance are the same set, and for ``--check`` queries of each kind our result equals a full
numpy scan sorted by (distance, index). Peak resident memory of the process is reported next to the
database's size (the search keeps ``O(queries x k)`` beside the codes, never ``queries x database``).
Timings are the best of ``--repeat`` runs after one warm-up (the warm-up includes numba's compile
on a first use).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Callable, Dict, List

import numpy as np

POPCOUNT8 = np.asarray([bin(v).count("1") for v in range(256)], dtype=np.uint8)


def random_packed(rng: np.random.Generator, n: int, bits: int) -> np.ndarray:
    """``(n, ceil(bits/8))`` uint8 random codes with zero padding bits."""
    nbytes = (bits + 7) // 8
    packed = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    pad = 8 * nbytes - bits
    if pad:
        packed[:, -1] &= np.uint8((0xFF << pad) & 0xFF)
    return packed


def reference(q_packed_row: np.ndarray, db_packed: np.ndarray, k: int, chunk: int = 1 << 20):
    """Exact top ``k`` of one query by a full numpy scan and a stable sort by (distance, index)."""
    dist = np.empty(len(db_packed), dtype=np.int64)
    for c0 in range(0, len(db_packed), chunk):
        dist[c0:c0 + chunk] = POPCOUNT8[db_packed[c0:c0 + chunk] ^ q_packed_row].sum(1, dtype=np.int64)
    order = np.argsort(dist, kind="stable")[:k]  # stable: equal distances stay in index order
    return dist[order], order


def best_time(fn: Callable[[], object], repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def scan_seconds(db_packed: np.ndarray, repeat: int) -> float:
    """Seconds to read ``db_packed`` once with every thread (a parallel sum of its bytes as words)."""
    from numba import njit, prange

    @njit(parallel=True, cache=False)
    def _sum_parallel(words):
        s = np.uint64(0)
        for i in prange(words.shape[0]):
            s += words[i]
        return s

    @njit(cache=False)
    def _sum(words):
        s = np.uint64(0)
        for i in range(words.shape[0]):
            s += words[i]
        return s

    flat = db_packed.reshape(-1)
    usable = len(flat) // 8 * 8
    words = flat[:usable].view(np.uint64)
    # the faster of one thread and all threads: a small database is read before threads have started
    return min(best_time(lambda: _sum_parallel(words), repeat), best_time(lambda: _sum(words), repeat))


def check(q_bits, db_packed, k, ours, faiss_res, n_check: int, kind: str) -> None:
    d, i = ours
    fd, fi = faiss_res
    if not np.array_equal(d, fd.astype(np.int64)):
        raise AssertionError(f"{kind}: distances differ from faiss")
    for r in range(len(d)):
        kth = d[r, -1]
        if set(i[r][d[r] < kth].tolist()) != set(fi[r][fd[r] < kth].tolist()):
            raise AssertionError(f"{kind}: query {r}: items closer than the k-th distance differ from faiss")
    q_packed = np.packbits(q_bits, axis=1)
    for r in range(min(n_check, len(d))):
        rd, ri = reference(q_packed[r], db_packed, k)
        if not (np.array_equal(rd, d[r]) and np.array_equal(ri, i[r])):
            raise AssertionError(f"{kind}: query {r}: not the exact (distance, index) top {k}")


def run_case(n: int, bits: int, args, rng) -> List[Dict]:
    import faiss

    from dsrh_lightning.search.engines import packed_words, search_numba

    db = random_packed(rng, n, bits)
    q_bits = rng.integers(0, 2, (max(args.batch, args.single), bits), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(8 * db.shape[1])
    index.add(db)
    k = min(args.k, n)
    single_q = q_bits[:args.single]
    batch_q = q_bits[:args.batch]
    single_qp = np.packbits(single_q, axis=1)
    batch_qp = np.packbits(batch_q, axis=1)

    words = packed_words(db)  # once, like faiss's add (a view for 64 bits, a padded copy for 48)

    def ours_single():
        return [search_numba(single_q[r:r + 1], words, k) for r in range(len(single_q))]

    def faiss_single():
        return [index.search(single_qp[r:r + 1], k) for r in range(len(single_qp))]

    # correctness first, on the very calls that are timed
    o = ours_single()
    f = faiss_single()
    check(single_q, db, k, (np.concatenate([x[0] for x in o]), np.concatenate([x[1] for x in o])),
          (np.concatenate([x[0] for x in f]), np.concatenate([x[1] for x in f])), args.check, "single")
    check(batch_q, db, k, search_numba(batch_q, words, k), index.search(batch_qp, k), args.check, "batch")

    bound = scan_seconds(db, args.repeat)
    rows = []
    for kind, nq, ours_fn, faiss_fn in (
            ("single", len(single_q), ours_single, faiss_single),
            ("batch", len(batch_q), lambda: search_numba(batch_q, words, k), lambda: index.search(batch_qp, k))):
        t_ours = best_time(ours_fn, args.repeat)
        t_faiss = best_time(faiss_fn, args.repeat)
        rows.append({"n": n, "bits": bits, "kind": kind, "queries": nq, "k": k,
                     "ours_qps": nq / t_ours, "faiss_qps": nq / t_faiss, "bound_qps": 1.0 / bound,
                     "ours_over_bound": (t_ours / nq) / bound, "ours_over_faiss": t_faiss / t_ours,
                     "db_bytes": int(db.nbytes), "scan_s": bound,
                     "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
    del index
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[20_000], help="database sizes (default: tiny)")
    ap.add_argument("--bits", type=int, nargs="+", default=[48, 64], help="code lengths (default 48 64)")
    ap.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    ap.add_argument("--single", type=int, default=20, help="queries searched one at a time (default 20)")
    ap.add_argument("--batch", type=int, default=1000, help="queries in the batch (default 1000)")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs, best kept (default 3)")
    ap.add_argument("--check", type=int, default=3, help="queries of each kind checked by a full scan (default 3)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for both engines (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = ap.parse_args(argv)
    if min(args.sizes) < 1 or min(args.bits) < 1 or args.k < 1 or args.single < 1 or args.batch < 1:
        ap.error("sizes, bits, k, single and batch must be positive")

    import faiss
    import numba

    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    rows = []
    for n in args.sizes:
        for bits in args.bits:
            rows.extend(run_case(n, bits, args, rng))
            print(f"done: {n} codes of {bits} bits", file=sys.stderr)
    print(f"threads: {args.threads}, k = {args.k}, best of {args.repeat}; exact results checked against faiss's "
          f"distances and a full scan")
    print("| codes | bits | queries | ours q/s | faiss q/s | scan bound q/s | ours / faiss | ours time per query / scan "
          "| database | peak RSS |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['n']:,} | {r['bits']} | {r['kind']} ({r['queries']}) | {r['ours_qps']:,.0f} | "
              f"{r['faiss_qps']:,.0f} | {r['bound_qps']:,.0f} | {r['ours_over_faiss']:.2f}x | "
              f"{r['ours_over_bound']:.1f}x | {r['db_bytes'] / 2**20:,.1f} MiB | {r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    if args.json:
        from dsrh_lightning.files import write_text

        write_text(args.json, json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
