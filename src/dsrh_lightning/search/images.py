"""Image files named on the command line: discovery and a dataset that reads them."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

from ..errors import DsrhError

__all__ = ["IMAGE_EXTENSIONS", "ImageInputError", "find_images", "ImagePaths"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ImageInputError(DsrhError, ValueError):
    """An image (or folder of images) given on the command line cannot be used."""


def find_images(inputs: Iterable[str]) -> List[Path]:
    """Image files named in ``inputs`` as absolute paths: files as given, folders searched recursively (sorted)."""
    found: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ImageInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under folder {p}")
            found.extend(f.resolve() for f in files)
        elif p.is_file():
            found.append(p.resolve())
        else:
            raise ImageInputError(f"{p}: no such image file or folder")
    if not found:
        raise ImageInputError("no images given")
    return found


class ImagePaths:
    """A map-style dataset of image files: ``(transform(image), 0, i)``."""

    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                arr = np.array(img.convert("RGB"))
        except Exception as exc:
            raise ImageInputError(f"cannot read image {self.paths[i]}: {type(exc).__name__}: {exc}") from None
        return self.transform(arr), 0, i
