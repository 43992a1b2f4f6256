"""Benchmark retrieval_metrics against a naive per-query numpy argsort and faiss.

    python -m benchmarks.bench_eval [--cases cifar,nuswide,million] [--repeat N] [--torch-engine]
    python -m benchmarks.bench_eval --cases tiny --torch-engine   # smoke check, not a timing

Each case runs in its own subprocess; peak extra memory = sampled RSS peak minus RSS before the call.
``ours`` is ``retrieval_metrics`` with its default engine (numba on CPU when installed); the first
call of each case runs against an empty numba cache (a fresh NUMBA_CACHE_DIR), so it includes
the JIT compilation and is reported on its own. ``--torch-engine`` also times ``engine="torch"``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

CASES = {
    "cifar": dict(nq=1000, nd=59000, bits=48, labels="single10", topk=None, naive_q=1000),
    "nuswide": dict(nq=2100, nd=193734, bits=48, labels="nuswide", topk=5000, naive_q=2100),
    "million": dict(nq=100, nd=1_000_000, bits=48, labels="single10", topk=1000, naive_q=20),
    # a smoke check that the script and its agreement asserts run (seconds, plus the JIT); not a timing
    "tiny": dict(nq=40, nd=2000, bits=48, labels="single10", topk=100, naive_q=40),
}


def _nuswide_labels():
    env = os.environ.get("DSRH_SHARED_DATA")
    root = Path(env) if env else ROOT.parent / "shared" / "data"
    path = root / "nuswide21" / "train.txt"
    if not path.is_file():
        return None
    return np.array([[int(x) for x in line.split()[1:]] for line in path.read_text().splitlines() if line.strip()],
                    dtype=np.uint8)


def make_case(cfg, seed=0):
    """Class-correlated codes: each label set has a prototype; codes = prototype with 20% bit flips."""
    rng = np.random.default_rng(seed)
    n = cfg["nq"] + cfg["nd"]
    k = cfg["bits"]
    if cfg["labels"] == "single10":
        labels = rng.integers(0, 10, n)
        proto = rng.integers(0, 2, (10, k))
        base = proto[labels]
        src = "synthetic 10 classes"
    else:
        pool = _nuswide_labels()
        src = "real NUS-WIDE-21 train label vectors (resampled)"
        if pool is None:
            pool = (rng.random((10500, 21)) < 0.14).astype(np.uint8)
            pool[pool.sum(1) == 0, 0] = 1
            src = "synthetic multi-hot (NUS-WIDE list not found)"
        labels = pool[rng.integers(0, len(pool), n)]
        proto = rng.normal(size=(21, k))
        base = (labels @ proto > 0).astype(np.int64)
    flips = rng.random((n, k)) < 0.2
    codes = (base ^ flips).astype(np.uint8)
    q = slice(0, cfg["nq"])
    d = slice(cfg["nq"], n)
    return codes[q], codes[d], labels[q], labels[d], src


def naive_map(qc, dc, ql, dl, topk, nq_run):
    """Per-query: ±1 dot product, np.argsort(kind='stable'), relevance, AP@K (the usual DeepHash loop)."""
    qs, ds = qc.astype(np.float32) * 2 - 1, dc.astype(np.float32) * 2 - 1
    k = qc.shape[1]
    nd = dc.shape[0]
    K = nd if topk is None else min(topk, nd)
    multi = ql.ndim == 2
    dlf = dl.astype(np.float32) if multi else dl
    aps = []
    for i in range(nq_run):
        ham = 0.5 * (k - ds @ qs[i])
        order = np.argsort(ham, kind="stable")[:K]
        rel = ((dlf @ ql[i].astype(np.float32)) > 0) if multi else (dl == ql[i])
        r = rel[order]
        hits = np.cumsum(r)
        n = r.sum()
        aps.append(float((hits[r] / (np.flatnonzero(r) + 1)).sum() / n) if n else 0.0)
    return np.array(aps)


def faiss_map(qc, dc, ql, dl, topk):
    import faiss

    nd = dc.shape[0]
    K = nd if topk is None else min(topk, nd)
    index = faiss.IndexBinaryFlat(qc.shape[1])
    index.add(np.packbits(dc, axis=1))
    t = time.perf_counter()
    _, ids = index.search(np.packbits(qc, axis=1), K)
    t_search = time.perf_counter() - t
    multi = ql.ndim == 2
    aps = []
    for i in range(len(qc)):
        rel = (dl[ids[i]] @ ql[i] > 0) if multi else (dl[ids[i]] == ql[i])
        hits = np.cumsum(rel)
        n = rel.sum()
        aps.append(float((hits[rel] / (np.flatnonzero(rel) + 1)).sum() / n) if n else 0.0)
    return float(np.mean(aps)), time.perf_counter() - t, t_search


LOAD_START = os.getloadavg()[0]


def rss_mib():
    """Current resident set size of this process (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


class PeakRSS:
    """Sample RSS every 2 ms in a thread; ``extra`` = peak minus RSS at start (MiB).

    ru_maxrss cannot be used here: it is a lifetime maximum, and building the test
    data already sets it higher than the evaluation itself needs.
    """

    def __enter__(self):
        import threading

        self.base = self.peak = rss_mib()
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, rss_mib())

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mib())
        self.extra = self.peak - self.base


def run_case(name, repeat, threads, torch_engine=False):
    import torch

    if threads:
        torch.set_num_threads(threads)

    from dsrh_lightning.metrics import engine_numba, retrieval_metrics

    cfg = CASES[name]
    qc, dc, ql, dl, src = make_case(cfg)
    tq, td = torch.from_numpy(qc), torch.from_numpy(dc)
    tql, tdl = torch.from_numpy(ql.astype(np.int64)), torch.from_numpy(dl.astype(np.int64))
    engine = "numba" if engine_numba.HAVE_NUMBA else "torch"
    t = time.perf_counter()
    retrieval_metrics(tq, td, tql, tdl, topk=cfg["topk"])  # first call: JIT compile (empty cache) + run
    t_first = time.perf_counter() - t
    times = []
    with PeakRSS() as mem:
        for _ in range(repeat):
            t = time.perf_counter()
            res = retrieval_metrics(tq, td, tql, tdl, topk=cfg["topk"])
            times.append(time.perf_counter() - t)
    peak = mem.extra
    t_torch = None
    if torch_engine:
        torch_times = []
        for _ in range(repeat):
            t = time.perf_counter()
            res_t = retrieval_metrics(tq, td, tql, tdl, topk=cfg["topk"], engine="torch")
            torch_times.append(time.perf_counter() - t)
        assert abs(res_t["map"] - res["map"]) < 1e-9, (res_t["map"], res["map"])
        t_torch = min(torch_times)
    nq_run = cfg["naive_q"]
    naive_times = []
    for _ in range(repeat):
        t = time.perf_counter()
        naive = naive_map(qc, dc, ql, dl, cfg["topk"], nq_run)
        naive_times.append((time.perf_counter() - t) * cfg["nq"] / nq_run)
    t_naive = min(naive_times)
    full = retrieval_metrics(tq[:nq_run], td, tql[:nq_run], tdl, topk=cfg["topk"])["map"]
    assert abs(full - naive.mean()) < 1e-9, (full, naive.mean())
    out = dict(case=name, shape=f"{cfg['nq']}x{cfg['nd']}x{cfg['bits']}", labels=src, topk=cfg["topk"],
               engine=engine, t_first_call=t_first, t_torch_engine=t_torch,
               numba_threads=engine_numba.numba.get_num_threads() if engine_numba.HAVE_NUMBA else None,
               loadavg_1min_start=LOAD_START,
               map=res["map"], t_ours=min(times), t_naive=t_naive, naive_extrapolated=nq_run < cfg["nq"],
               naive_queries=nq_run, peak_extra_mib=peak, threads=torch.get_num_threads(),
               loadavg_1min_end=os.getloadavg()[0])
    try:
        fmap, t_faiss, t_search = faiss_map(qc, dc, ql, dl, cfg["topk"])
        # faiss may order equal distances differently from (distance, index): close, not identical
        assert abs(fmap - res["map"]) < 1e-2, (fmap, res["map"])
        out.update(t_faiss=t_faiss, t_faiss_search=t_search, faiss_map=fmap)
    except ImportError:
        pass
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="cifar,nuswide,million")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    ap.add_argument("--torch-engine", action="store_true", help='also time engine="torch"')
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        print(json.dumps(run_case(args._child, args.repeat, args.threads, args.torch_engine)))
        return 0
    rows = []
    import tempfile

    for name in args.cases.split(","):
        with tempfile.TemporaryDirectory(prefix="bench-numba-cache-") as cache:
            env = dict(os.environ, NUMBA_CACHE_DIR=cache)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_eval", "--_child", name, "--repeat", str(args.repeat),
                                   "--threads", str(args.threads)] + (["--torch-engine"] if args.torch_engine else []),
                                  capture_output=True, text=True, env=env, cwd=ROOT)
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
            return proc.returncode
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    hdr = (f"{'case':8} {'shape':22} {'topk':>5} {'MAP':>8} {'ours s':>8} {'naive s':>9} {'x naive':>8} "
           f"{'faiss s':>8} {'x faiss':>8} {'torch s':>8} {'peak MiB':>9} {'1st call':>9} {'load':>9}")
    print(hdr)
    for r in rows:
        naive = f"{r['t_naive']:.2f}" + ("*" if r["naive_extrapolated"] else "")
        fa = r.get("t_faiss")
        tt = r.get("t_torch_engine")
        print(f"{r['case']:8} {r['shape']:22} {str(r['topk']):>5} {r['map']:8.4f} {r['t_ours']:8.3f} {naive:>9} "
              f"{r['t_naive'] / r['t_ours']:8.1f} {fa if fa is None else format(fa, '.2f'):>8} "
              f"{'' if fa is None else format(fa / r['t_ours'], '.1f'):>8} {'' if tt is None else format(tt, '.2f'):>8} "
              f"{r['peak_extra_mib']:9.0f} {r['t_first_call']:9.2f} "
              f"{r['loadavg_1min_start']:4.1f}/{r['loadavg_1min_end']:<4.1f}")
    print(f"ours = retrieval_metrics, engine {rows[0]['engine'] if rows else '?'}; times: best of --repeat runs; "
          "1st call = first call with an empty numba cache (JIT compile + one run); "
          "load = 1-min load average at start/end of the case (2 cores)")
    print("* naive time extrapolated from a subset of queries; MAP equal (1e-9) to naive stable argsort; faiss MAP within 1e-2 (its tie order differs)")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
