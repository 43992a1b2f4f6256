"""The image behind an index id: ``<dataset>#<source index>`` for in-memory data sets (as ``dsrh index
split=...`` writes them), or an image file path."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError
from ..files import write_bytes
from ..search.codes_file import is_memory_id

__all__ = ["parse_id", "image_of_id", "png_bytes", "write_png", "IdLookup"]

def parse_id(text: str) -> Optional[Tuple[str, int]]:
    """``(dataset, source index)`` of an in-memory id such as ``cifar10#53001``; None for anything else.

    What is an in-memory id is defined once, by the codes file (:func:`~dsrh_lightning.search.codes_file.is_memory_id`),
    so every id ``dsrh index`` writes is read back here."""
    text = text.strip()
    if not is_memory_id(text):
        return None
    dataset, index = text.rsplit("#", 1)
    return dataset, int(index)


def png_bytes(img: np.ndarray) -> bytes:
    """An ``(h, w, 3)`` uint8 image as PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.asarray(img, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_png(path, img: np.ndarray) -> None:
    write_bytes(path, png_bytes(img))


class IdLookup:
    """Images and labels of ids, from one data set loaded once (``cfg``: a run config, with overrides)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self._source = None

    @property
    def source(self):
        if self._source is None:
            from ..data.datamodule import load_source

            self._source = load_source(self.cfg.data, int(self.cfg.seed))[0]
        return self._source

    def image(self, item_id: str) -> Tuple[np.ndarray, str]:
        """``(uint8 HWC image, label text)``; raises InputError naming the id when it cannot be shown."""
        parsed = parse_id(item_id)
        if parsed is None:
            path = Path(item_id)
            if not path.is_file():
                raise InputError(f"{item_id}: neither an image file nor an id of the form <dataset>#<index>")
            from PIL import Image

            try:
                with Image.open(path) as im:
                    return np.asarray(im.convert("RGB")), "-"
            except Exception as exc:
                raise InputError(f"{item_id}: not a readable image ({type(exc).__name__})") from None
        dataset, index = parsed
        src = self.source
        if dataset != src.name:
            raise InputError(f"{item_id}: an id of data set {dataset!r}, but the data settings load {src.name!r} "
                             f"(give dataset={dataset} or the checkpoint the index was made with)")
        if not 0 <= index < len(src.labels):
            raise InputError(f"{item_id}: no image {index} in {src.name} ({len(src.labels)} images, 0.."
                             f"{len(src.labels) - 1})")
        return np.asarray(src.images[index]), label_text(src.labels[index], src.class_names)


def label_text(label, class_names: Optional[Sequence[str]] = None) -> str:
    """A class id or multi-hot row as names (ids where no name is known)."""
    arr = np.asarray(label)
    ids = [int(arr)] if arr.ndim == 0 else np.flatnonzero(arr).tolist()
    names = [str(class_names[i]) if class_names is not None and i < len(class_names) else str(i) for i in ids]
    return ",".join(names) or "-"


def image_of_id(item_id: str, overrides: Sequence[str] = (), ckpt: Optional[str] = None) -> Tuple[np.ndarray, str]:
    """The image and label text of ``item_id``; the data settings come from ``ckpt`` (with ``overrides``)
    or, for ``<dataset>#<index>``, from ``dataset=<dataset>`` and ``overrides``."""
    from ..config import load_config

    if ckpt:
        from ..runs.checkpoints import load_run

        cfg = load_run(ckpt, overrides, build_module=False).cfg
    else:
        parsed = parse_id(item_id)
        if parsed is None:
            return IdLookup(None).image(item_id)
        cfg = load_config([f"dataset={parsed[0]}", *overrides])
    return IdLookup(cfg).image(item_id)
