"""The hash function of a trained run, from Python.

>>> from dsrh_lightning.runs.hasher import Hasher, Index
>>> hasher = Hasher.from_checkpoint("runs/my-run/checkpoints/last.ckpt")
>>> packed = hasher.encode(["a.jpg", "photos/"])          # (n, ceil(bits/8)) uint8, np.packbits layout
>>> bits = hasher.encode(pil_image, unpacked=True)         # (1, bits) in {0, 1}
>>> Index("db_codes/").search(packed, k=10).ids

Every picture goes through the run's evaluation preprocessing
(:class:`~dsrh_lightning.search.preprocess.EvalPreprocess`), whatever form it comes in: image files
(or folders of them), PIL images, uint8 numpy arrays ``(H, W, 3)`` / ``(n, H, W, 3)``, torch tensors
``(3, H, W)`` / ``(n, 3, H, W)`` (uint8, or float in [0, 1]); a run trained on cached features also
takes those features (:meth:`Hasher.encode_features`). So the same picture gets the same code as
through ``dsrh index split=...`` and ``dsrh index FOLDER``.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..search.encode import encoder
from ..search.images import MAX_IMAGE_PIXELS, ImageInputError, as_uint8_image, find_images
from ..search.index import Index, SearchResult
from ..search.preprocess import EvalPreprocess
from .checkpoints import Run, load_run

__all__ = ["Hasher", "Index", "SearchResult"]


class Hasher:
    """Pictures (or cached features) -> binary codes with a loaded run (see the module docstring)."""

    def __init__(self, run: Run, device: str = "cpu", batch_size: Optional[int] = None,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.run = run
        self.cfg = run.cfg
        self.bits = int(run.cfg.model.bits)
        self.threshold = float(run.cfg.eval.threshold)
        self.weights_hash = run.weights_hash
        self.device = torch.device(device)
        self.batch_size = int(batch_size or run.cfg.data.eval_batch_size)
        self.max_pixels = int(max_pixels)
        self.preprocess = EvalPreprocess(run.cfg)
        self.model = encoder(run).to(self.device).eval()  # images -> relaxed codes
        self.head = run.module.to(self.device).eval()  # the trained module (cached features -> codes)

    @classmethod
    def from_checkpoint(cls, path, device: str = "cpu", overrides: Sequence[str] = (), **kwargs) -> "Hasher":
        """Open a checkpoint written by ``dsrh train`` (safely: tensors and plain data only)."""
        return cls(load_run(Path(path), overrides), device=device, **kwargs)

    @property
    def image_size(self) -> int:
        """Side of the network input every picture is resized to."""
        return self.preprocess.size

    def __repr__(self) -> str:
        return f"Hasher({str(self.run.path)!r}, bits={self.bits}, image_size={self.image_size}, device={self.device})"

    def pictures(self, images) -> List[np.ndarray]:
        """The pictures in ``images`` as a list of uint8 ``(H, W, 3)`` arrays (folders expanded, sorted)."""
        if isinstance(images, np.ndarray) and images.ndim == 2 and images.dtype != np.uint8:
            raise ImageInputError(f"a 2-D {images.dtype} array {images.shape} is not a picture; cached features "
                                  "go to Hasher.encode_features")
        if isinstance(images, (str, Path)):
            items = find_images([str(images)]) if Path(images).is_dir() else [images]
        elif isinstance(images, np.ndarray) and images.ndim == 4:
            items = list(images)
        elif hasattr(images, "detach") and images.ndim == 4:
            items = list(images)
        elif isinstance(images, np.ndarray) or hasattr(images, "detach") or hasattr(images, "convert"):
            items = [images]
        elif isinstance(images, Sequence) or hasattr(images, "__iter__"):
            items = []
            for x in images:
                if isinstance(x, (str, Path)) and Path(x).is_dir():
                    items.extend(find_images([str(x)]))
                else:
                    items.append(x)
        else:
            items = [images]
        return [as_uint8_image(x, f"image {n}", self.max_pixels) for n, x in enumerate(items)]

    @torch.no_grad()
    def relaxed(self, images) -> torch.Tensor:
        """``(n, bits)`` float sigmoid outputs of the pictures in ``images`` (before the threshold)."""
        pics = self.pictures(images)
        out = [self.model(self.preprocess.batch(pics[s:s + self.batch_size]).to(self.device)).float().cpu()
               for s in range(0, len(pics), self.batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.bits)

    def _codes(self, relaxed: torch.Tensor, unpacked: bool) -> np.ndarray:
        bits = (relaxed > self.threshold).to(torch.uint8).numpy()
        return bits if unpacked else np.packbits(bits, axis=1)

    def encode(self, images, unpacked: bool = False) -> np.ndarray:
        """Codes of the pictures in ``images``: packed ``(n, ceil(bits/8))`` uint8 (``np.packbits``, the
        codes-file layout), or ``(n, bits)`` {0,1} uint8 with ``unpacked=True``. One picture gives ``n = 1``."""
        return self._codes(self.relaxed(images), unpacked)

    @torch.no_grad()
    def encode_features(self, features, unpacked: bool = False) -> np.ndarray:
        """Codes of cached backbone features ``(n, d)`` (runs trained with ``data.cache_features``)."""
        if not self.run.feature_dim:
            raise ImageInputError(f"{self.run.path} was trained on images, not cached features; use encode()")
        x = torch.as_tensor(np.asarray(features, dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        if x.ndim != 2 or x.shape[1] != int(self.run.feature_dim):
            raise ImageInputError(f"features must be (n, {self.run.feature_dim}) for {self.run.path}, got "
                                  f"{tuple(x.shape)}")
        out = [self.head(x[s:s + self.batch_size].to(self.device)).float().cpu()
               for s in range(0, len(x), self.batch_size)]
        return self._codes(torch.cat(out) if out else torch.zeros(0, self.bits), unpacked)

    def search(self, index, images, k: int = 10) -> SearchResult:
        """Encode ``images`` and search ``index`` (an :class:`Index` or a path to a codes file / folder)."""
        index = index if isinstance(index, Index) else Index(index)
        if index.bits != self.bits:
            raise ImageInputError(f"{index.path} holds {index.bits}-bit codes; {self.run.path} makes {self.bits}")
        return index.search(self.encode(images), k)
