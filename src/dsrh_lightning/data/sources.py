"""Image sources: each returns a :class:`Source` of uint8 HWC images and labels.

Sources only load; splitting into query/train/database happens in
:mod:`dsrh_lightning.data.protocol`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DsrhError
from ..errors import DataError

__all__ = ["Source", "DataNotFoundError", "resolve_root", "load_cifar10", "make_synthetic"]

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)


class DataNotFoundError(DsrhError, FileNotFoundError):
    """The data set is not where the configuration says; the message says how to provide it."""


@dataclass
class Source:
    """All images of a data set in memory.

    Attributes:
        images: ``(n, h, w, 3)`` uint8 RGB array, or lazy image files
            (:class:`~dsrh_lightning.data.image_list.ImageFiles`).
        labels: ``(n,)`` int64 class ids (or ``(n, c)`` multi-hot for multi-label sets).
        class_names: one name per class / label column.
        name: data set name (used in split file names).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.images, np.ndarray):  # lazy image files (ImageFiles)
            if len(self.images) != len(self.labels):
                raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")
            return
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"{self.name}: images must be uint8 of shape (n, h, w, 3), got {self.images.dtype} {self.images.shape}"
            )
        if len(self.images) != len(self.labels):
            raise ValueError(f"{self.name}: {len(self.images)} images but {len(self.labels)} labels")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def native_size(self) -> Optional[int]:
        """Side of the (square) in-memory images; None for image files of varying size."""
        return int(self.images.shape[1]) if isinstance(self.images, np.ndarray) else None


def resolve_root(root: str, dataset: str) -> Path:
    """The data directory: ``root`` if set, else ``$DSRH_DATA_DIR``, else ``./data/<dataset>``."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("DSRH_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path("data") / dataset


def _find_npz(root: Path) -> Optional[Path]:
    if root.is_file() and root.suffix == ".npz":
        return root
    if not root.is_dir():
        return None
    preferred = root / "cifar10.npz"
    if preferred.is_file():
        return preferred
    candidates = sorted(root.glob("*.npz"))
    return candidates[0] if len(candidates) == 1 else None


def load_cifar10_npz(path: Path) -> Source:
    """Load a ``.npz`` with ``x_train, y_train, x_test, y_test`` (uint8 NHWC, int labels)."""
    with np.load(path, allow_pickle=False) as data:
        missing = [k for k in NPZ_KEYS if k not in data.files]
        if missing:
            raise DataError(
                f"{path}: missing keys {missing}; found {sorted(data.files)}. "
                f"Expected {', '.join(NPZ_KEYS)} (uint8 images (n, 32, 32, 3), int class ids (n,))"
            )
        images = np.concatenate([data["x_train"], data["x_test"]])
        labels = np.concatenate([data["y_train"], data["y_test"]]).astype(np.int64)
        names = tuple(str(c) for c in data["classes"]) if "classes" in data.files else CIFAR10_CLASSES
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
        raise DataError(f"{path}: x_train/x_test must have shape (n, 32, 32, 3), got {images.shape[1:]}")
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"{path}: class ids must be in [0, {len(names)}), found {labels.min()}..{labels.max()}")
    return Source(images.astype(np.uint8, copy=False), labels, names, "cifar10")


def load_cifar10(root: Path, download: bool = True) -> Source:
    """CIFAR-10 (train + test, 60,000 images) from a ``.npz`` or torchvision's folder.

    Looks, in order, for ``root`` itself as a ``.npz`` file, ``root/cifar10.npz`` (or
    the only ``.npz`` in ``root``), and torchvision's ``root/cifar-10-batches-py``;
    downloads the latter when ``download`` is true and the network allows.
    """
    npz = _find_npz(root)
    if npz is not None:
        return load_cifar10_npz(npz)
    try:
        from torchvision.datasets import CIFAR10
    except ImportError as exc:  # pragma: no cover - torchvision is a dependency
        raise DataNotFoundError(f"torchvision is needed to read {root}/cifar-10-batches-py") from exc
    have_folder = (root / "cifar-10-batches-py").is_dir()
    if not have_folder and not download:
        raise DataNotFoundError(_cifar_help(root, "and data.download=false"))
    try:
        train = CIFAR10(str(root), train=True, download=download and not have_folder)
        test = CIFAR10(str(root), train=False, download=False)
    except Exception as exc:  # network errors, corrupt archives
        raise DataNotFoundError(_cifar_help(root, f"and the download failed ({type(exc).__name__}: {exc})")) from None
    images = np.concatenate([train.data, test.data]).astype(np.uint8)
    labels = np.concatenate([np.asarray(train.targets), np.asarray(test.targets)]).astype(np.int64)
    return Source(images, labels, tuple(train.classes), "cifar10")


def _cifar_help(root: Path, why: str) -> str:
    return (
        f"CIFAR-10 not found in '{root}' (looked for {root}/cifar10.npz, any single *.npz there, "
        f"and torchvision's {root}/cifar-10-batches-py) {why}. "
        "Provide it by one of: set data.root=PATH or DSRH_DATA_DIR=PATH (or DATA_DIR=PATH with make) "
        "to a folder holding cifar10.npz (keys x_train, y_train, x_test, y_test) or cifar-10-batches-py; "
        "or run once with network access and data.download=true."
    )


def make_synthetic(
    num_classes: int = 10, per_class: int = 200, image_size: int = 32, seed: int = 0
) -> Source:
    """A seeded synthetic image set with class structure (not noise).

    Each class has a smooth random colour pattern (a prototype); an image is its
    class prototype, randomly shifted and brightness-scaled, plus pixel noise.
    Classes are separable but not trivially so, which makes it a useful smoke
    test for retrieval: MAP well above chance is reachable in a few hundred steps.

    Returns:
        Source with ``num_classes * per_class`` images of shape ``(image_size, image_size, 3)``.
    """
    if num_classes < 2 or per_class < 1:
        raise ValueError(f"synthetic data needs >= 2 classes and >= 1 image per class, got {num_classes}, {per_class}")
    rng = np.random.default_rng(seed)
    low = 4
    # Smooth prototypes: upsample a low-resolution random pattern.
    coarse = rng.uniform(0, 1, size=(num_classes, low, low, 3))
    reps = int(np.ceil(image_size / low))
    protos = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :image_size, :image_size]
    n = num_classes * per_class
    labels = np.repeat(np.arange(num_classes), per_class)
    shifts = rng.integers(-3, 4, size=(n, 2))
    scale = rng.uniform(0.7, 1.3, size=(n, 1, 1, 1))
    images = protos[labels]
    images = np.stack([np.roll(img, tuple(s), axis=(0, 1)) for img, s in zip(images, shifts)])
    images = images * scale + rng.normal(0, 0.15, size=images.shape)
    images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return Source(images, labels.astype(np.int64), tuple(f"class{i}" for i in range(num_classes)), "synthetic")
