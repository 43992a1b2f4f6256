"""The evaluation preprocessing of a trained run, for pictures from anywhere.

:class:`EvalPreprocess` turns uint8 ``(H, W, 3)`` pictures of any size into the network input
``(n, 3, s, s)`` exactly as the run's data module prepared its evaluation (and feature-cache) images:

* in-memory data sets (synthetic, cifar10, cifar10_multilabel) with ``data.augment_on=device`` or
  ``data.cache_features``: :class:`~dsrh_lightning.data.transforms.BatchTransform` (float bilinear resize,
  rounded, then normalised);
* image-file data sets with ``data.augment_on=device``: torchvision's uint8 resize, then the batch
  normalisation;
* otherwise torchvision's per-image evaluation transform (uint8 resize, ``ToDtype`` + ``Normalize``).

The two resizes round differently (about 1 pixel value in 8 differs by 1 at 128 px), enough to move
codes by a few bits: so a picture written to a PNG file gets the code of the same picture in the data
set only if both go through the same one. Every picture is resized to ``s x s`` (a picture already of
that size is left as it is, as in the data module), so pictures of any and mixed sizes are accepted.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch

__all__ = ["IN_MEMORY_DATASETS", "native_image_size", "EvalPreprocess"]

#: Data sets whose images live in one uint8 array (their evaluation may run on the device path).
IN_MEMORY_DATASETS = ("synthetic", "cifar10", "cifar10_multilabel")


def native_image_size(cfg) -> Optional[int]:
    """Side of the training images of in-memory data sets (from the config alone), None for image files."""
    d = cfg.data
    if d.dataset == "synthetic":
        return int(d.synthetic_image_size)
    if d.dataset == "cifar10":
        return 32
    if d.dataset == "cifar10_multilabel":
        return 32 * int(d.mosaic_grid)
    return None


class EvalPreprocess:
    """uint8 ``(H, W, 3)`` pictures -> the run's evaluation input, float ``(n, 3, size, size)``.

    ``one(image)`` gives ``(3, size, size)`` for one picture (the per-item path of a DataLoader);
    ``batch(images)`` stacks many (pictures of one shape are transformed together on the device path).
    The same picture gives the same tensor either way.
    """

    def __init__(self, cfg) -> None:
        from ..data.transforms import BatchTransform, build_transform, evaluation_transform

        d = cfg.data
        native = native_image_size(cfg)
        self.size, _ = evaluation_transform(d, cfg.model.weights, native)
        s = self.size
        in_memory = d.dataset in IN_MEMORY_DATASETS
        self.batched: Optional[BatchTransform] = None
        self.per_image = None
        if in_memory and (d.cache_features or d.augment_on == "device"):
            self.path = "batch"
            self.batched = BatchTransform(s, native, False, False, d.mean, d.std)
        elif not in_memory and d.augment_on == "device" and not d.cache_features:
            self.path = "resize+batch"
            self.per_image = build_transform(s, None, False, False, d.mean, d.std, normalize=False)
            self.batched = BatchTransform(s, s, False, False, d.mean, d.std)
        else:
            self.path = "per-image"
            # native_size=None: always resized to s x s (a picture already s x s is left as it is).
            self.per_image = build_transform(s, None, False, False, d.mean, d.std)

    def __repr__(self) -> str:
        return f"EvalPreprocess(size={self.size}, path={self.path!r})"

    def one(self, image: np.ndarray) -> torch.Tensor:
        """``(3, size, size)`` float for one uint8 ``(H, W, 3)`` picture."""
        if self.path == "batch":
            return self.batched(torch.from_numpy(np.ascontiguousarray(image))[None])[0]
        if self.path == "resize+batch":
            return self.batched(self.per_image(image)[None])[0]
        return self.per_image(image)

    __call__ = one

    def batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """``(n, 3, size, size)`` float for ``n`` uint8 pictures of any (and mixed) sizes."""
        if not len(images):
            return torch.zeros(0, 3, self.size, self.size)
        if self.path != "batch":
            return torch.stack([self.one(im) for im in images])
        out: List[Optional[torch.Tensor]] = [None] * len(images)
        groups: dict = {}
        for i, im in enumerate(images):
            groups.setdefault(im.shape, []).append(i)
        for rows in groups.values():
            x = self.batched(torch.from_numpy(np.stack([images[i] for i in rows])))
            for r, i in enumerate(rows):
                out[i] = x[r]
        return torch.stack(out)
