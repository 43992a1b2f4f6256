"""Image-list data sets: the list format the deep-hashing community uses.

One image per line, a path relative to a data root followed by either one class
id (``dog/001.jpg 3``) or a multi-hot vector (``images/0571.jpg 1 1 0 ... 1``).
Lists are checked completely when they are read (at ``setup``, before training
starts), so a long run never dies later on a bad line.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import DsrhError

log = logging.getLogger(__name__)

__all__ = ["ImageList", "ImageListError", "ImageDecodeError", "ImageFiles", "read_image_list", "check_images", "usable_images"]


class ImageListError(DsrhError, ValueError):
    """A problem in a list file; the message names the file and line."""


@dataclass
class ImageList:
    """Parsed list file: ``paths`` (relative, as written) and ``labels``.

    ``labels`` is ``(n,)`` int64 class ids or ``(n, c)`` int64 multi-hot.
    ``lines`` gives the line number of each kept path (for ``file:line`` in later errors).
    ``skipped`` records ``(line number, reason)`` for lines dropped under ``on_bad="skip"``.
    """

    file: Path
    paths: List[str]
    labels: np.ndarray
    skipped: List[Tuple[int, str]] = field(default_factory=list)
    lines: List[int] = field(default_factory=list)

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def origins(self) -> List[str]:
        """``file:line`` of each kept path."""
        return [f"{self.file}:{n}" for n in self.lines]


# A class id may exceed the number of distinct ids in a list (a list may hold a subset of the
# classes), but not by this much: the classifier has one output per id up to the largest.
_MAX_ID_SLACK, _MAX_ID_FACTOR = 1000, 10


def _inside(root: Path, rel: str, base: Optional[Path] = None) -> Optional[str]:
    """``rel`` normalised once: the resolved path relative to the resolved ``root`` (``./a``, ``b/../a``,
    a symlink to ``a`` and an absolute path inside the root all give ``a``), or None when it lies outside.
    ``base`` is ``root.resolve()``, passed in when many paths share one root."""
    base = root.resolve() if base is None else base
    try:
        return (root / rel).resolve().relative_to(base).as_posix()
    except ValueError:
        return None


def _is_int(v: str) -> bool:
    try:
        int(v)
    except ValueError:
        return False
    return True


def _split_line(line: str) -> List[str]:
    """Path and label tokens; a path containing spaces may be written in double quotes."""
    line = line.strip()
    if line.startswith('"'):
        close = line.find('"', 1)
        if close > 0:
            return [line[1:close]] + line[close + 1:].split()
    return line.split()


def read_image_list(file: Path, root: Path, num_labels: Optional[int] = None, on_bad: str = "error",
                    allow_unlabelled: bool = False) -> ImageList:
    """Parse and validate a list file (UTF-8, an optional byte-order mark is accepted).

    Args:
        file: the list file.
        root: the data root paths are relative to (a path may not escape it; an
            absolute path inside it is accepted and stored relative to it).
            A path with spaces is written in double quotes: ``"my dir/a.jpg" 3``.
        num_labels: expected multi-hot width (None = the number of values most lines
            have; one value is a class id, more is multi-hot).
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
    skipped: List[Tuple[int, str]] = []

    def bad(lineno: int, reason: str) -> None:
        if on_bad == "error":
            raise ImageListError(f"{file}:{lineno}: {reason}")
        skipped.append((lineno, reason))

    # Pass 1: decode and tokenise every line, so the label width is known before any line is judged.
    entries: List[Tuple[int, List[str]]] = []
    with file.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # UTF-8 byte-order mark (Windows editors write one)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad(lineno, f"byte 0x{raw[exc.start]:02x} at column {exc.start + 1} is not UTF-8; "
                            "save the list as UTF-8")
                continue
            parts = _split_line(line)
            if parts:
                entries.append((lineno, parts))
    width = num_labels
    if width is None:
        counts = Counter(len(p) - 1 for _, p in entries if len(p) > 1 and all(_is_int(v) for v in p[1:]))
        if counts:
            # The most common number of values (ties: the first line's); an odd first line is then blamed itself.
            top = max(counts.values())
            first = next(len(p) - 1 for _, p in entries if len(p) - 1 in counts and counts[len(p) - 1] == top)
            width = first
    paths: List[str] = []
    rows: List[List[int]] = []
    lines: List[int] = []
    seen: Dict[str, int] = {}
    base = Path(root).resolve()
    for lineno, parts in entries:
        rel, values = parts[0], parts[1:]
        inside = _inside(root, rel, base)
        if inside is None:
            raise ImageListError(f"{file}:{lineno}: path {rel} escapes the data root {root}")
        if inside in seen:
            raise ImageListError(f"{file}:{lineno}: path {rel} repeats line {seen[inside]} (both are {inside})")
        if not values:
            bad(lineno, f"{rel} has no label (expected a class id or {width or 'c'} 0/1 values)")
            continue
        if not all(_is_int(v) for v in values):
            lead = next(i for i, v in enumerate(values) if _is_int(v)) if any(_is_int(v) for v in values) else -1
            if lead > 0 and all(_is_int(v) for v in values[lead:]):
                path, labs = " ".join(parts[:lead + 1]), " ".join(values[lead:][:8])
                bad(lineno, f"the path '{path}' seems to contain a space (read as path '{rel}' with labels "
                            f"'{' '.join(values[:8])}'); write the path in double quotes (\"{path}\" {labs}) "
                            "or rename the file")
            else:
                bad(lineno, f"labels of {rel} are not integers: {' '.join(values[:8])} (expected "
                            "'path class_id' or 'path 0 1 ... 1')")
            continue
        ints = [int(v) for v in values]
        if len(ints) != width:
            how = "data.num_labels" if num_labels is not None else "most lines of this list"
            bad(lineno, f"{rel} has {len(ints)} label values, expected {width} (as {how})")
            continue
        if width > 1:
            if any(v not in (0, 1) for v in ints):
                bad(lineno, f"multi-hot labels of {rel} must be 0/1, got {' '.join(values)}")
                continue
            if not allow_unlabelled and not any(ints):
                bad(lineno, f"{rel} has no positive label (all {width} values are 0)")
                continue
        elif ints[0] < 0:
            bad(lineno, f"class id of {rel} is negative ({ints[0]})")
            continue
        seen[inside] = lineno
        paths.append(inside)
        rows.append(ints)
        lines.append(lineno)
    if skipped:
        log.warning("%s: skipped %d bad line(s), first: line %d: %s", file, len(skipped), *skipped[0])
    if not paths:
        raise ImageListError(f"{file}: no usable lines")
    arr = np.asarray(rows, dtype=np.int64)
    labels = arr[:, 0] if width == 1 else arr
    if width == 1:
        distinct = len(np.unique(labels))
        limit = max(_MAX_ID_SLACK, _MAX_ID_FACTOR * distinct)
        top = int(np.argmax(labels))
        if labels[top] >= limit:
            raise ImageListError(
                f"{file}:{lines[top]}: class id {int(labels[top])} is far beyond the {distinct} distinct class ids "
                f"in this list (the classifier gets one output per id up to the largest); number the classes "
                f"0..C-1 (ids up to {limit - 1} are accepted)")
    return ImageList(file, paths, labels, skipped, lines)


class ImageDecodeError(ImageListError):
    """An image that cannot be decoded when it is loaded; the message names its ``file:line``.

    Raised inside a DataLoader worker, torch re-raises it in the main process as
    ``ImageDecodeError("Caught ImageDecodeError in DataLoader worker ...<traceback>...")``;
    the constructor keeps only the original message, so the command line prints one clear line.
    """

    def __init__(self, message: str = "") -> None:
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class ImageFiles:
    """Lazy image files under ``root``: ``files[i]`` -> uint8 RGB ``(h, w, 3)`` array.

    An image that fails to decode at load time (a truncated PNG, a JPEG with corrupt
    scan data: their headers pass ``data.check_images=header``) is handled by ``on_bad``:

    - ``"error"``: :class:`ImageDecodeError` naming the list ``file:line`` (``origins``) and what to do;
    - ``"skip"``: the image is replaced by the next image (cyclically, in pool order) that has the
      same labels and belongs to exactly the same split sets (:meth:`set_groups`) and decodes;
      the replacement is deterministic (it depends only on the files), logged with both
      ``file:line``s, and counted in ``decode_failures`` (per process: each loader worker counts
      its own). Without ``labels`` or without a same-labels same-split image, it is an error.
    """

    def __init__(self, root: Path, paths: Sequence[str], origins: Optional[Sequence[str]] = None,
                 labels: Optional[np.ndarray] = None, on_bad: str = "error") -> None:
        self.root = Path(root)
        self.paths = list(paths)
        self.origins = list(origins) if origins is not None else None
        self.labels = None if labels is None else np.asarray(labels)
        self.on_bad = on_bad
        self.groups: Optional[np.ndarray] = None
        self.decode_failures = 0
        self._replacement: Dict[int, int] = {}
        if self.origins is not None and len(self.origins) != len(self.paths):
            raise ValueError(f"{len(self.origins)} origins for {len(self.paths)} paths")
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.labels)} labels for {len(self.paths)} paths")

    def __len__(self) -> int:
        return len(self.paths)

    def origin(self, i: int) -> str:
        """Where image ``i`` was listed (``file:line``), or its path when unknown."""
        return self.origins[i] if self.origins is not None else str(self.root / self.paths[i])

    def set_groups(self, groups: Dict[str, np.ndarray]) -> None:
        """Split sets (name -> pool positions); a replacement must belong to the same sets as the original."""
        sig = np.zeros(len(self.paths), dtype=np.int64)
        for bit, key in enumerate(sorted(groups)):
            positions = groups[key]
            if positions is not None:
                sig[np.asarray(positions, dtype=np.int64)] |= 1 << bit
        self.groups = sig
        self._replacement.clear()

    def _decode(self, i: int) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / self.paths[i]) as img:
            return np.array(img.convert("RGB"))

    def __getitem__(self, i: int) -> np.ndarray:
        i = int(i)
        if i in self._replacement:
            return self._decode(self._replacement[i])
        try:
            return self._decode(i)
        except Exception as exc:
            why = f"{type(exc).__name__}: {exc}"
        path = self.root / self.paths[i]
        if self.on_bad != "skip":
            raise ImageDecodeError(
                f"{self.origin(i)}: image {path} cannot be decoded ({why}); fix or remove it, set data.on_bad=skip "
                "to use another image with the same labels in its place, or data.check_images=decode to find "
                "every such image before training")
        j, image = self._substitute(i)
        if j is None:
            raise ImageDecodeError(
                f"{self.origin(i)}: image {path} cannot be decoded ({why}) and data.on_bad=skip found no other "
                "decodable image with the same labels in the same split to use in its place; fix or remove it")
        self._replacement[i] = j
        self.decode_failures += 1
        log.warning("%s: image %s cannot be decoded (%s); using %s (%s, same labels and split) in its place "
                    "(data.on_bad=skip; %d such image(s) so far in this process; data.check_images=decode "
                    "drops them before training instead)", self.origin(i), path, why, self.paths[j],
                    self.origin(j), self.decode_failures)
        return image

    def _substitute(self, i: int):
        if self.labels is None:
            return None, None
        n = len(self.paths)
        same = np.ones(n, dtype=bool)
        lab = self.labels[i]
        same &= (self.labels == lab).reshape(n, -1).all(1)
        if self.groups is not None:
            same &= self.groups == self.groups[i]
        same[i] = False
        for j in np.roll(np.arange(n), -(i + 1)):
            if same[j]:
                try:
                    return int(j), self._decode(int(j))
                except Exception:
                    same[j] = False
        return None, None


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
                where = f"{files.origin(i)}: " if files.origins is not None else ""
                raise ImageListError(f"{where}image {path} is {reason} (set data.on_bad=skip to drop such images)")
            bad.append(i)
    if bad:
        log.warning("%d image(s) missing or unreadable under %s were skipped, first: %s",
                    len(bad), files.root, files.paths[bad[0]])
    return bad


def usable_images(root: Path, paths: Sequence[str], mode: str, on_bad: str, origins: Optional[Sequence[str]] = None,
                  labels: Optional[np.ndarray] = None) -> tuple["ImageFiles", np.ndarray]:
    """Check the images (:func:`check_images`) and keep the usable ones.

    Returns the files and ``keep``, the positions in ``paths`` that were kept
    (all of them unless ``on_bad="skip"`` dropped some). ``origins`` (``file:line``
    per path) and ``labels`` are kept alongside for load-time decode errors
    (see :class:`ImageFiles`).
    """
    files = ImageFiles(root, paths, origins, labels, on_bad)
    bad = check_images(files, mode, on_bad)
    if not bad:
        return files, np.arange(len(paths))
    keep = np.setdiff1d(np.arange(len(paths)), bad)
    return ImageFiles(root, [paths[i] for i in keep], None if origins is None else [origins[i] for i in keep],
                      None if labels is None else np.asarray(labels)[keep], on_bad), keep
