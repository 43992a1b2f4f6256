"""Image-list data sets: the list format the deep-hashing community uses.

One image per line, a path relative to a data root followed by either one class
id (``dog/001.jpg 3``) or a multi-hot vector (``images/0571.jpg 1 1 0 ... 1``).
Lists are checked completely when they are read (at ``setup``, before training
starts), so a long run never dies later on a bad line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

log = logging.getLogger(__name__)

__all__ = ["ImageList", "ImageListError", "ImageFiles", "read_image_list", "check_images", "usable_images"]


class ImageListError(ValueError):
    """A problem in a list file; the message names the file and line."""


@dataclass
class ImageList:
    """Parsed list file: ``paths`` (relative, as written) and ``labels``.

    ``labels`` is ``(n,)`` int64 class ids or ``(n, c)`` int64 multi-hot.
    ``skipped`` records ``(line number, reason)`` for lines dropped under ``on_bad="skip"``.
    """

    file: Path
    paths: List[str]
    labels: np.ndarray
    skipped: List[Tuple[int, str]] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2


def _is_inside(root: Path, rel: str) -> bool:
    if Path(rel).is_absolute():
        return False
    base = root.resolve()
    target = (root / rel).resolve()
    return target == base or base in target.parents


def read_image_list(file: Path, root: Path, num_labels: Optional[int] = None, on_bad: str = "error",
                    allow_unlabelled: bool = False) -> ImageList:
    """Parse and validate a list file.

    Args:
        file: the list file.
        root: the data root paths are relative to (a path may not escape it).
        num_labels: expected multi-hot width (None = take it from the first line;
            a line with one value is a class id, otherwise multi-hot).
        on_bad: ``"error"`` raises on the first bad line; ``"skip"`` drops bad lines
            and records them (logged with a count). Duplicated paths and paths
            escaping the root are errors under both policies.
        allow_unlabelled: accept all-zero multi-hot rows (an image with no label).

    Raises:
        ImageListError naming the file and line number.
    """
    file = Path(file)
    if not file.is_file():
        raise ImageListError(f"list file {file} does not exist")
    if on_bad not in ("error", "skip"):
        raise ValueError(f"on_bad must be 'error' or 'skip', got {on_bad!r}")
    paths: List[str] = []
    rows: List[List[int]] = []
    skipped: List[Tuple[int, str]] = []
    seen: Dict[str, int] = {}
    width = num_labels
    with file.open() as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if not parts:
                continue
            rel, values = parts[0], parts[1:]

            def bad(reason: str) -> None:
                if on_bad == "error":
                    raise ImageListError(f"{file}:{lineno}: {reason}")
                skipped.append((lineno, reason))

            if rel in seen:
                raise ImageListError(f"{file}:{lineno}: path {rel} repeats line {seen[rel]}")
            if not _is_inside(root, rel):
                raise ImageListError(f"{file}:{lineno}: path {rel} escapes the data root {root}")
            if not values:
                bad(f"{rel} has no label (expected a class id or {width or 'c'} 0/1 values)")
                continue
            try:
                ints = [int(v) for v in values]
            except ValueError:
                bad(f"labels of {rel} are not integers: {' '.join(values[:8])}")
                continue
            if width is None:
                width = 1 if len(ints) == 1 else len(ints)
            if len(ints) != width:
                bad(f"{rel} has {len(ints)} label values, expected {width} (as on the first line / data.num_labels)")
                continue
            if width > 1:
                if any(v not in (0, 1) for v in ints):
                    bad(f"multi-hot labels of {rel} must be 0/1, got {' '.join(values)}")
                    continue
                if not allow_unlabelled and not any(ints):
                    bad(f"{rel} has no positive label (all {width} values are 0)")
                    continue
            elif ints[0] < 0:
                bad(f"class id of {rel} is negative ({ints[0]})")
                continue
            seen[rel] = lineno
            paths.append(rel)
            rows.append(ints)
    if skipped:
        log.warning("%s: skipped %d bad line(s), first: line %d: %s", file, len(skipped), *skipped[0])
    if not paths:
        raise ImageListError(f"{file}: no usable lines")
    arr = np.asarray(rows, dtype=np.int64)
    labels = arr[:, 0] if width == 1 else arr
    return ImageList(file, paths, labels, skipped)


class ImageFiles:
    """Lazy image files under ``root``: ``files[i]`` -> uint8 RGB ``(h, w, 3)`` array."""

    def __init__(self, root: Path, paths: Sequence[str]) -> None:
        self.root = Path(root)
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.root / self.paths[i]
        try:
            with Image.open(path) as img:
                return np.array(img.convert("RGB"))
        except Exception as exc:
            raise OSError(f"cannot read image {path}: {exc}") from None


def check_images(files: ImageFiles, mode: str = "header", on_bad: str = "error",
                 progress: bool = True) -> List[int]:
    """Check every image before training: ``exists``, ``header`` (PIL can identify it) or ``decode``.

    Returns the positions of bad images (only under ``on_bad="skip"``; otherwise
    raises ``ImageListError`` naming the file).
    """
    from PIL import Image

    if mode == "none":
        return []
    bad: List[int] = []
    iterator = range(len(files))
    if progress and len(files) > 2000:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc=f"checking images ({mode})", unit="img")
    for i in iterator:
        path = files.root / files.paths[i]
        reason = None
        if not path.is_file():
            reason = "missing"
        elif mode in ("header", "decode"):
            try:
                with Image.open(path) as img:
                    if mode == "decode":
                        img.load()
            except Exception as exc:
                reason = f"unreadable ({type(exc).__name__}: {exc})"
        if reason:
            if on_bad == "error":
                raise ImageListError(f"image {path} is {reason} (set data.on_bad=skip to drop such images)")
            bad.append(i)
    if bad:
        log.warning("%d image(s) missing or unreadable under %s were skipped, first: %s",
                    len(bad), files.root, files.paths[bad[0]])
    return bad


def usable_images(root: Path, paths: Sequence[str], mode: str, on_bad: str) -> tuple["ImageFiles", np.ndarray]:
    """Check the images (:func:`check_images`) and keep the usable ones.

    Returns the files and ``keep``, the positions in ``paths`` that were kept
    (all of them unless ``on_bad="skip"`` dropped some).
    """
    files = ImageFiles(root, paths)
    bad = check_images(files, mode, on_bad)
    if not bad:
        return files, np.arange(len(paths))
    keep = np.setdiff1d(np.arange(len(paths)), bad)
    return ImageFiles(root, [paths[i] for i in keep]), keep
