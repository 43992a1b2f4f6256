"""Torch datasets over an in-memory :class:`~dsrh_lightning.data.sources.Source`.

Two ways to fetch: ``dataset[i]`` (one finished item, as any torch dataset) and ``dataset.fetch(rows)``
(one collated batch in one call: cached features are gathered with one tensor index, in-memory uint8
images travel raw with their augmentation parameters and are finished on the device by
:class:`~dsrh_lightning.data.transforms.BatchTransform`). The data module's loaders use ``fetch``
through :class:`BatchedFetch`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from ..seeding import apply_seeded, item_seed
from .sampling import sample_triplets

__all__ = ["BatchedFetch", "IndexedImageDataset", "RawImages", "TripletDataset", "unbatched"]


@dataclass
class RawImages:
    """A batch of uint8 images ``(n, H, W, 3)`` not yet transformed, with their per-item augmentation
    parameters ``(n, 5)`` (None: evaluation, no augmentation); ``lead`` is the batch's leading shape
    (``(b,)``, or ``(b, 3)`` for explicit triplets). Finished by the data module's ``on_after_batch_transfer``."""

    pixels: torch.Tensor
    params: Optional[torch.Tensor]
    lead: tuple


class IndexedImageDataset(Dataset):
    """Images ``source.images[indices]``; items are ``(image, label, index)``.

    ``index`` is the position inside this subset (0..len-1), so evaluation can
    restore the original order after distributed gathering.

    ``transform`` maps one image to a tensor (the worker path; None = identity, e.g. cached features).
    ``batch_transform`` (a :class:`BatchTransform`) selects the device path: :meth:`fetch` returns
    :class:`RawImages` and ``dataset[i]`` finishes the one item on the CPU. With both (image files on
    the device path), ``transform`` decodes/crops/resizes one image to uint8 ``(s, s, 3)`` in the worker
    and ``batch_transform`` only normalises on the device.

    With ``seed`` set and a random transform, the augmentation of item ``i`` is seeded by
    ``(seed, epoch, i)`` (:meth:`set_epoch`): by the global generator on the worker path (as before),
    by an explicit ``torch.Generator`` on the device path. A non-random transform is never seeded.
    """

    def __init__(self, images, labels: np.ndarray, indices: np.ndarray, transform: Optional[Callable],
                 seed: Optional[int] = None, batch_transform=None, random: Optional[bool] = None) -> None:
        self.images = images
        self.labels = torch.as_tensor(labels)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.transform = transform
        self.batch_transform = batch_transform
        if random is None:
            random = batch_transform.random if batch_transform is not None else transform is not None
        self.random = bool(random) and seed is not None
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def item_seeds(self, rows: Sequence[int], epoch_items: Sequence[int], slots: Sequence[int]) -> Optional[list]:
        """Per-item seeds ``(seed, epoch, item, slot)``, or None when the transform is not random."""
        if not self.random:
            return None
        return [item_seed(self.seed, self.epoch, int(i), int(s)) for i, s in zip(epoch_items, slots)]

    def load(self, i: int, seed: Optional[int] = None) -> torch.Tensor:
        """The finished image of item ``i``; ``seed`` fixes its random augmentation."""
        if self.batch_transform is not None:
            if self.transform is not None:
                return self.batch_transform(self._worker_pixels(i, seed)[None])[0]
            raw = self.raw_images(np.array([i]), None if seed is None else [seed], (1,))
            return self.batch_transform(raw.pixels, raw.params)[0]
        if self.transform is None:
            return self.images[self.indices[i]]
        return self._worker_pixels(i, seed)

    def _worker_pixels(self, i: int, seed: Optional[int]) -> torch.Tensor:
        """Item ``i`` through the per-image ``transform`` (seeded by ``seed`` when given)."""
        image = self.images[self.indices[i]]
        return self.transform(image) if seed is None else apply_seeded(self.transform, image, seed)

    def raw_images(self, rows: np.ndarray, seeds: Optional[list], lead: tuple) -> RawImages:
        """uint8 images of items ``rows`` and, with ``seeds``, their augmentation parameters."""
        pixels = torch.from_numpy(np.ascontiguousarray(self.images[self.indices[rows]]))
        params = None
        if seeds is not None:
            _, h, w, _ = pixels.shape
            draw = self.batch_transform.draw
            # One explicit generator per item, seeded by seeding.item_seed: never the global generator.
            params = torch.stack([draw(torch.Generator().manual_seed(s), h, w) for s in seeds]) \
                if len(seeds) else torch.zeros(0, self.batch_transform.NUM_PARAMS)
        return RawImages(pixels, params, lead)

    def images_at(self, rows: np.ndarray, seeds: Optional[list], lead: tuple):
        """The images of items ``rows`` as one batch of leading shape ``lead``: one gather when possible."""
        rows = np.asarray(rows, dtype=np.int64)
        if self.batch_transform is not None and self.transform is not None:
            seeds = seeds if seeds is not None else [None] * len(rows)
            pixels = torch.stack([self._worker_pixels(int(r), s) for r, s in zip(rows, seeds)])
            return RawImages(pixels, None, lead)
        if self.batch_transform is not None:
            return self.raw_images(rows, seeds, lead)
        if self.transform is None and hasattr(self.images, "gather"):  # cached features: one tensor index
            out = self.images.gather(self.indices[rows])
        elif self.transform is None and isinstance(self.images, (np.ndarray, torch.Tensor)):
            out = torch.as_tensor(self.images[self.indices[rows]])
        else:
            seeds = seeds if seeds is not None else [None] * len(rows)
            out = torch.stack([self.load(int(r), s) for r, s in zip(rows, seeds)])
        return out.reshape(*lead, *out.shape[1:])

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def subset_labels(self) -> torch.Tensor:
        return self.labels[torch.as_tensor(self.indices)]

    def subset_labels_at(self, rows) -> torch.Tensor:
        """Labels of subset items ``rows``."""
        return self.labels.index_select(0, torch.as_tensor(self.indices[rows]).reshape(-1)).reshape(
            *np.shape(rows), *self.labels.shape[1:])

    def __getitem__(self, i: int):
        seed = item_seed(self.seed, self.epoch, i) if self.random else None
        return self.load(i, seed), self.labels[self.indices[i]], i

    def fetch(self, rows: Sequence[int]):
        """Items ``rows`` as one collated batch ``(images, labels, index)`` (equal to collating ``self[i]``,
        except that the device path returns :class:`RawImages` for the images)."""
        rows = np.asarray(rows, dtype=np.int64)
        seeds = self.item_seeds(rows, rows, [0] * len(rows))
        return (self.images_at(rows, seeds, (len(rows),)), self.subset_labels_at(rows), torch.from_numpy(rows))


class TripletDataset(Dataset):
    """Explicit (query, positive, negative) triplets over the training subset.

    Triplets are redrawn each epoch (``set_epoch``) from the labels with a seed
    derived from ``(seed, epoch)``, so a run is reproducible and a resumed run
    sees the same triplets. Items are ``(images (3, C, H, W), labels (3, ...))``.
    """

    def __init__(self, base: IndexedImageDataset, per_anchor: int, seed: int) -> None:
        self.base = base
        self.per_anchor = per_anchor
        self.seed = seed
        self.labels = base.subset_labels.numpy()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        if getattr(self, "epoch", None) == epoch:
            return
        self.epoch = epoch
        self.triplets = sample_triplets(self.labels, self.per_anchor, seed=self.seed * 100003 + epoch)

    def __len__(self) -> int:
        return len(self.triplets)

    def _seeds(self, ids: np.ndarray) -> Optional[list]:
        # Augmentation seeded by (seed, epoch, triplet, slot): independent of the global random state;
        # no seeding at all when the base transform is not random (cached features, augment=false).
        if not self.base.random:
            return None
        return [item_seed(self.seed, self.epoch, int(i), slot) for i in ids for slot in range(3)]

    def __getitem__(self, i: int):
        rows = np.asarray(self.triplets[i], dtype=np.int64)
        seeds = self._seeds(np.array([i]))
        images = [self.base.load(int(j), None if seeds is None else seeds[slot]) for slot, j in enumerate(rows)]
        return torch.stack(images), self.base.subset_labels_at(rows)

    def fetch(self, ids: Sequence[int]):
        """Triplets ``ids`` as one batch ``(images (b, 3, ...), labels (b, 3, ...))``."""
        ids = np.asarray(ids, dtype=np.int64)
        rows = np.asarray(self.triplets[ids], dtype=np.int64).reshape(-1, 3)
        images = self.base.images_at(rows.reshape(-1), self._seeds(ids), (len(ids), 3))
        labels = self.base.subset_labels_at(rows.reshape(-1))
        return images, labels.reshape(len(ids), 3, *labels.shape[1:])


class BatchedFetch(Dataset):
    """A view of a dataset with ``fetch(rows)`` whose DataLoader fetches each batch in one call
    (``__getitems__``; use it with ``collate_fn=unbatched``). Other attributes are the dataset's."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]

    def __getitems__(self, rows):
        return self.dataset.fetch(rows)

    def __getattr__(self, name: str):
        if name == "dataset":  # during unpickling in a worker
            raise AttributeError(name)
        return getattr(self.dataset, name)


def unbatched(batch):
    """``collate_fn`` of :class:`BatchedFetch` loaders: the batch is already collated (a single item is not)."""
    return batch if isinstance(batch, tuple) else default_collate(batch)
