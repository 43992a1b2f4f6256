"""In-batch ranking losses: gathered triplets vs one (b, b) distance matrix, forward + backward.

For each batch size, times (ms per step, median of alternating rounds) the DSRH triplet hinge and
Zhao et al.'s weighted multilevel hinge over every valid in-batch triplet, computed

* gathered: mine the (a, p, n) index lists, gather a ``(t, k)`` code matrix per role, hinge per triplet
  (one code row per triplet role);
* matrix: one ``(b, b)`` distance matrix, hinge over the ``(b, b, b)`` valid mask
  (:func:`~dsrh_lightning.losses.triplet.mined_triplet_loss`,
  :func:`~dsrh_lightning.losses.semantic_ranking.mined_weighted_ranking_loss`).

Labels: single-label batches of ``b / 8`` classes x 8 images (class-balanced sampling) and, for the
weighted loss, multi-hot labels over 21 concepts. Run alone on the machine for numbers:

    python -m benchmarks.bench_mining [--batch-sizes 64 128 256] [--bits 48] [--device cpu]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsrh_lightning.losses.miners import mine_all_triplets, mine_multilevel_triplets
from dsrh_lightning.losses.semantic_ranking import mined_weighted_ranking_loss, weighted_ranking_loss
from dsrh_lightning.losses.triplet import mined_triplet_loss, triplet_ranking_loss

def _gathered_triplet(codes, labels):
    a, p, n = mine_all_triplets(labels)
    return triplet_ranking_loss(codes[a], codes[p], codes[n], 1.0)


def _matrix_triplet(codes, labels):
    return mined_triplet_loss(codes, labels, 1.0)[0]


def _gathered_weighted(codes, labels):
    q, i, j, w = mine_multilevel_triplets(labels)
    return weighted_ranking_loss(codes, q, i, j, w, 1.0)


def _matrix_weighted(codes, labels):
    return mined_weighted_ranking_loss(codes, labels, 1.0)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_ms(fn, codes, labels, steps: int) -> float:
    device = codes.device
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        x = codes.detach().requires_grad_(True)
        fn(x, labels).backward()
    _sync(device)
    return (time.perf_counter() - start) * 1000 / steps


def bench(b: int, bits: int, device: torch.device, steps: int, rounds: int):
    g = torch.Generator().manual_seed(b)
    codes = torch.rand(b, bits, generator=g).to(device)
    single = torch.arange(b // 8).repeat_interleave(8)[torch.randperm(b, generator=g)].to(device)
    multi = (torch.rand(b, 21, generator=g) < 0.15).long().to(device)
    rows = []
    for loss, labels, gathered, matrix in [("triplet", single, _gathered_triplet, _matrix_triplet),
                                           ("weighted", multi, _gathered_weighted, _matrix_weighted)]:
        for fn in (gathered, matrix):  # warm-up
            _step_ms(fn, codes, labels, 1)
        times = {"gathered": [], "matrix": []}
        for _ in range(rounds):  # alternating rounds: a change of load hits both alike
            times["gathered"].append(_step_ms(gathered, codes, labels, steps))
            times["matrix"].append(_step_ms(matrix, codes, labels, steps))
        g_ms, m_ms = statistics.median(times["gathered"]), statistics.median(times["matrix"])
        rows.append((loss, b, bits, g_ms, m_ms, g_ms / m_ms))
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--bits", type=int, default=48)
    ap.add_argument("--steps", type=int, default=5, help="forward+backward steps per timed round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    print(f"device={device} torch_threads={torch.get_num_threads()} steps={args.steps} rounds={args.rounds}")
    print(f"{'loss':<9} {'b':>5} {'k':>4} {'gathered ms':>12} {'matrix ms':>10} {'speed-up':>9}")
    for b in args.batch_sizes:
        for loss, bb, k, g_ms, m_ms, ratio in bench(b, args.bits, device, args.steps, args.rounds):
            print(f"{loss:<9} {bb:>5} {k:>4} {g_ms:>12.2f} {m_ms:>10.2f} {ratio:>8.2f}x")


if __name__ == "__main__":
    main()
