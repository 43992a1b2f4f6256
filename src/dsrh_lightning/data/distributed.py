"""Distributed-aware, resumable training batches.

Lightning's automatic ``DistributedSampler`` is not resumable mid-epoch: after a
restart the epoch is replayed from its first batch while the step counter goes
on, so a resumed run sees different triplets than an uninterrupted one. Here
the training batches are a pure function of ``(seed, epoch, rank, world_size)``
and the loader records its position in checkpoints:

* :class:`EpochBatchSampler` shuffles the dataset with a ``(seed, epoch)`` seed and
  gives each rank a disjoint share of whole batches;
* :class:`ResumableDataLoader` is a ``DataLoader`` with ``state_dict`` /
  ``load_state_dict`` (Lightning saves them in checkpoints and restores them
  before the first batch), holding ``(epoch, batches done in the epoch)``; the
  next iteration starts at that batch without loading the skipped ones.

The trainer runs with ``use_distributed_sampler=False``; the data module adds a
plain ``DistributedSampler`` (no shuffling, padded) to the evaluation loaders,
and the evaluation callback drops the padding (see callbacks/retrieval.py).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
from torch.utils.data import DataLoader, Sampler

from ..config import ConfigError

__all__ = ["EpochBatchSampler", "ResumableBatches", "ResumableDataLoader"]


class ResumableBatches(Sampler[List[int]]):
    """What every training batch sampler shares: an epoch (:meth:`set_epoch`), a resume position
    (:meth:`resume_at`) and ``num_batches`` per epoch for this rank. Subclasses set ``num_batches``
    and draw their batches from ``(seed, epoch)``."""

    epoch: int = 0
    start_batch: int = 0
    num_batches: int = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def resume_at(self, batch: int) -> None:
        """The next iteration skips the first ``batch`` batches of this rank's share (mid-epoch resume)."""
        self.start_batch = int(batch)

    def __len__(self) -> int:
        return self.num_batches

class EpochBatchSampler(ResumableBatches):
    """Shuffled batches of ``batch_size`` indices, seeded by ``(seed, epoch)``, split over ranks.

    Each epoch permutes ``range(n)``, cuts it into ``len(self) * world_size`` full
    batches (the remainder is dropped) and rank ``r`` takes batches ``r, r + world, ...``,
    so the ranks' shares are disjoint. :meth:`resume_at` makes the next iteration
    start at a given batch of the rank's share.
    """

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.n, self.batch_size, self.seed = int(n), int(batch_size), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.epoch = 0
        self.start_batch = 0
        self.num_batches = self.n // (self.batch_size * self.world_size)
        if self.num_batches == 0:
            raise ConfigError(f"{self.n} training items are fewer than one batch of {self.batch_size} per process "
                             f"({self.world_size} processes); lower data.batch_size")

    def batches(self) -> List[List[int]]:
        """This rank's batches of the current epoch (ignoring :meth:`resume_at`)."""
        rng = np.random.default_rng([self.seed, self.epoch])
        perm = rng.permutation(self.n)[: self.num_batches * self.world_size * self.batch_size]
        all_batches = perm.reshape(-1, self.batch_size)
        return [b.tolist() for b in all_batches[self.rank :: self.world_size]]

    def __iter__(self) -> Iterator[List[int]]:
        start, self.start_batch = self.start_batch, 0
        yield from self.batches()[start:]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a batch sampler with ``set_epoch`` / ``resume_at``, resumable mid-epoch.

    ``position`` returns the number of batches of the current epoch that training
    has consumed (the data module reads it from the trainer), so the state is
    exact even though Lightning prefetches a batch ahead.
    """

    def __init__(self, *args, position: Optional[Callable[[], int]] = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._position = position

    def state_dict(self) -> Dict[str, int]:
        bs = self.batch_sampler
        done = int(self._position()) if self._position is not None else 0
        return {"epoch": int(getattr(bs, "epoch", 0)), "batches_done": done}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Make the next iteration continue where the checkpoint stopped.

        A checkpoint taken after the LAST batch of an epoch (``batches_done == len``) continues with
        batch 0 of the next epoch. (Skipping ``len`` batches of the next epoch instead made it empty, so
        the resumed run jumped from epoch e to e + 2.) Lightning does not call ``on_train_epoch_start``
        for that next epoch on restart, so the epoch is set here, on the sampler and the dataset.
        """
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self.batch_sampler):
            epoch, done = epoch + 1, 0
        for obj in (self.batch_sampler, self.dataset):
            if hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)
        self.batch_sampler.resume_at(done)
