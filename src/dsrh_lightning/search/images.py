"""Images from outside a data set (files named on the command line, PIL images, arrays, tensors):
discovery, safe decoding under a pixel limit, and conversion to one form (uint8 ``(H, W, 3)``)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterable, List, Sequence

import numpy as np

from ..errors import DsrhError

__all__ = ["IMAGE_EXTENSIONS", "MAX_IMAGE_PIXELS", "ImageInputError", "find_images", "load_image", "as_uint8_image",
           "ImagePaths"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Largest image (width x height) decoded for index/search; larger ones are refused from their header,
#: before decoding (a 100-megapixel RGB image is 300 MB decoded; a compressed file can be far smaller).
MAX_IMAGE_PIXELS = 100_000_000


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


def _too_large(what: str, width: int, height: int, max_pixels: int) -> ImageInputError:
    return ImageInputError(f"{what}: {width} x {height} = {width * height:,} pixels is more than the limit of "
                           f"{max_pixels:,}; shrink the image first (every image is resized to the model's input "
                           "size anyway)")


def load_image(path, max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """The image file ``path`` as uint8 ``(H, W, 3)`` RGB, decoded as the data sets decode image files
    (``PIL.Image.open(path).convert("RGB")``). Its size is checked from the header before decoding: more
    than ``max_pixels`` pixels raises :class:`ImageInputError`, as does an unreadable file."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise _too_large(str(path), width, height, max_pixels)
                return np.array(img.convert("RGB"))
    except ImageInputError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageInputError(f"{path}: refused by PIL as a decompression bomb ({exc}); the limit here is "
                              f"{max_pixels:,} pixels") from None
    except Exception as exc:
        raise ImageInputError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def as_uint8_image(image, what: str = "image", max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
    """One picture as uint8 ``(H, W, 3)``, from any of the forms a user may hold:

    * a path (``str`` / ``Path``): decoded by :func:`load_image`;
    * a PIL image: ``convert("RGB")``;
    * a numpy array ``(H, W, 3)`` uint8 (the data sets' layout), ``(H, W)`` grey or ``(H, W, 4)`` (alpha dropped,
      as PIL's ``convert("RGB")`` does);
    * a torch tensor ``(3, H, W)`` (torchvision's layout): uint8, or float in [0, 1] quantised to
      ``round(255 * x)``, so a picture has the same code as its uint8 version.
    """
    if isinstance(image, (str, Path)):
        return load_image(image, max_pixels)
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, np.ndarray):  # PIL image
        width, height = image.size
        if width * height > max_pixels:
            raise _too_large(what, width, height, max_pixels)
        return np.array(image.convert("RGB"))
    if hasattr(image, "detach"):  # torch tensor, CHW
        import torch

        t = image.detach().cpu()
        if t.ndim != 3 or t.shape[0] not in (1, 3):
            raise ImageInputError(f"{what}: a tensor image must be (3, H, W) (or (1, H, W) grey), got "
                                  f"{tuple(t.shape)}; numpy arrays are (H, W, 3)")
        if t.is_floating_point():
            if t.numel() and (not bool(t.isfinite().all()) or float(t.min()) < 0 or float(t.max()) > 1):
                raise ImageInputError(f"{what}: a float tensor image must hold values in [0, 1] (torchvision's "
                                      "ToTensor / ToDtype(scale=True)), not normalised values")
            t = (t * 255).round().to(torch.uint8)
        elif t.dtype != torch.uint8:
            raise ImageInputError(f"{what}: a tensor image must be uint8 or float in [0, 1], got {t.dtype}")
        arr = t.permute(1, 2, 0).numpy()
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            raise ImageInputError(f"{what}: a numpy image must be uint8 (H, W, 3), got {arr.dtype} {arr.shape}; "
                                  "floats in [0, 1] go in as a torch tensor (3, H, W)")
    else:
        raise ImageInputError(f"{what}: expected an image path, a PIL image, a uint8 numpy array (H, W, 3) or a "
                              f"torch tensor (3, H, W); got {type(image).__name__}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageInputError(f"{what}: expected an image (H, W, 3), got shape {arr.shape}")
    height, width = arr.shape[:2]
    if height == 0 or width == 0:
        raise ImageInputError(f"{what}: the image is empty ({height} x {width})")
    if width * height > max_pixels:
        raise _too_large(what, width, height, max_pixels)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


class ImagePaths:
    """A map-style dataset of image files: ``(transform(image), 0, i)`` where ``image`` is uint8
    ``(H, W, 3)`` from :func:`load_image` (checked against ``max_pixels`` before decoding)."""

    def __init__(self, paths: Sequence[Path], transform, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
        self.paths, self.transform, self.max_pixels = list(paths), transform, int(max_pixels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(load_image(self.paths[i], self.max_pixels)), 0, i
