"""Seeds as pure functions of (seed, position): the one place that derives them.

Every random draw of training (triplets, batch order, augmentation, dropout, mining)
is seeded from the run's ``seed`` and its position (epoch, item, step, rank, slot),
so a resumed or multi-process run draws exactly what an uninterrupted one does.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

__all__ = ["item_seed", "apply_seeded", "seed_device", "SLOT_STEP"]

_MASK = (1 << 63) - 1
# ``slot`` values in use: 0, 1, 2 = the three images of an explicit triplet (items use 0);
# SLOT_STEP = the per-step seed of dropout and in-batch mining.
SLOT_STEP = 1


def item_seed(seed: int, epoch: int, index: int, slot: int = 0) -> int:
    """A 63-bit seed that is a pure function of ``(seed, epoch, index, slot)``."""
    state = np.random.SeedSequence([int(seed) & _MASK, int(epoch), int(index), int(slot)]).generate_state(2, np.uint64)
    return int(state[0]) & _MASK


def apply_seeded(transform: Callable, image: Any, seed: int):
    """``transform(image)`` with torch's global CPU generator seeded by ``seed``, restored afterwards.

    Random augmentation then depends on which item is drawn, not on how many random
    numbers were consumed before (worker count, restarts, validation runs).
    """
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)  # the generator fork_rng restores, not every backend's
        return transform(image)


def seed_device(seed: int, device: torch.device) -> None:
    """Seed the default generator that random ops on ``device`` draw from (dropout, ``torch.rand``).

    On the CPU this seeds ``torch.default_generator`` alone, which is all ``torch.manual_seed`` changes
    for CPU ops, without its cost: ``torch.manual_seed`` also queues a seed for every lazily initialised
    backend (CUDA, XPU, MTIA), each formatting a stack trace, and this runs once per training step. On other
    devices it is ``torch.manual_seed``.
    """
    if torch.device(device).type == "cpu":
        torch.default_generator.manual_seed(int(seed))
    else:
        torch.manual_seed(int(seed))
