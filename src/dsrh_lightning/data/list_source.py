"""Sources built from list files: a user's own data set (``custom``) and NUS-WIDE-21.

Lists are merged into one pool of images; a path listed in several lists (the
training images are usually also database images) must carry the same labels
in each. The lists' membership becomes the preset protocol split.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from omegaconf import DictConfig

from .image_list import ImageList, ImageListError, read_image_list, usable_images
from .sources import DataNotFoundError, Source, resolve_root

log = logging.getLogger(__name__)

__all__ = ["NUSWIDE21_CONCEPTS", "ListPartition", "load_list_source", "load_nuswide_official"]

# Column order of the NUS-WIDE-21 lists used by deep-hashing papers: the 21 most frequent concepts of
# NUS-WIDE's AllLabels, by frequency (an inference; see data/README.md).
NUSWIDE21_CONCEPTS = (
    "sky", "clouds", "person", "water", "animal", "grass", "buildings", "window", "plants", "lake", "ocean",
    "road", "flowers", "sunset", "reflection", "rocks", "vehicle", "snow", "tree", "beach", "mountain",
)


@dataclass
class ListPartition:
    """Pool positions of each list's images (``None`` for a list not given)."""

    train: Optional[np.ndarray] = None
    query: Optional[np.ndarray] = None
    database: Optional[np.ndarray] = None
    all: Optional[np.ndarray] = None


def _resolve_list(path: str, root: Path) -> Path:
    p = Path(path).expanduser()
    if p.is_file() or p.is_absolute():
        return p
    return root / p


def _merge_lists(lists: Dict[str, ImageList]):
    pool_paths: List[str] = []
    pool_labels: List[np.ndarray] = []
    pool_origins: List[str] = []
    where: Dict[str, int] = {}
    origin: Dict[str, str] = {}
    parts: Dict[str, np.ndarray] = {}
    width = None
    for role, lst in lists.items():
        w = lst.labels.shape[1] if lst.multilabel else 1
        if width is not None and w != width:
            raise ImageListError(f"{lst.file}: {w} label value(s) per line, but other lists have {width}")
        width = w
        idx = []
        lines = lst.origins() if lst.lines else [str(lst.file)] * len(lst.paths)
        for path, lab, line in zip(lst.paths, lst.labels, lines):
            if path in where:
                j = where[path]
                if not np.array_equal(pool_labels[j], lab):
                    raise ImageListError(f"{path} has labels {np.atleast_1d(lab).tolist()} in {lst.file} but "
                                         f"{np.atleast_1d(pool_labels[j]).tolist()} in {origin[path]}")
            else:
                j = len(pool_paths)
                where[path], origin[path] = j, str(lst.file)
                pool_paths.append(path)
                pool_labels.append(lab)
                pool_origins.append(line)
            idx.append(j)
        parts[role] = np.asarray(idx, dtype=np.int64)
    return pool_paths, np.stack(pool_labels), parts, pool_origins


def load_list_source(d: DictConfig, name: str, class_names=None) -> tuple[Source, ListPartition]:
    """Read ``data.train_list / query_list / database_list`` (or ``data.list_file``) under the data root."""
    root = resolve_root(d.root, name)
    if not root.is_dir():
        raise DataNotFoundError(f"data root '{root}' for data.dataset={name} does not exist; set data.root=PATH "
                                f"(or DSRH_DATA_DIR / DATA_DIR=PATH with make)")
    given = {"train": d.train_list, "query": d.query_list, "database": d.database_list, "all": d.list_file}
    given = {k: v for k, v in given.items() if v}
    if not given:
        raise DataNotFoundError(f"data.dataset={name}: no list files configured; set data.train_list, "
                                "data.query_list and data.database_list (or data.list_file with a protocol split)")
    lists = {}
    for role, path in given.items():
        file = _resolve_list(path, root)
        if not file.is_file():
            raise DataNotFoundError(f"data.{'list_file' if role == 'all' else role + '_list'}: list file {file} "
                                    "does not exist")
        lists[role] = read_image_list(file, root, d.num_labels or None, d.on_bad, d.allow_unlabelled)
    paths, labels, parts, origins = _merge_lists(lists)
    files, keep = usable_images(root, paths, d.check_images, d.on_bad, origins, labels)
    if len(keep) < len(paths):
        remap = -np.ones(len(paths), dtype=np.int64)
        remap[keep] = np.arange(len(keep))
        labels = labels[keep]
        parts = {k: remap[v][remap[v] >= 0] for k, v in parts.items()}
    # A load-time replacement of an undecodable image stays inside the same lists (the datamodule
    # narrows this to the protocol split once it is made).
    files.set_groups(parts)
    if labels.ndim == 2:
        names = tuple(class_names) if class_names and len(class_names) == labels.shape[1] else \
            tuple(f"label{i}" for i in range(labels.shape[1]))
    else:
        n = int(labels.max()) + 1
        names = tuple(class_names) if class_names and len(class_names) == n else tuple(f"class{i}" for i in range(n))
    log.info("%s: %d images from %s", name, len(files), ", ".join(str(l.file) for l in lists.values()))
    return Source(files, labels, names, name), ListPartition(**parts)


NUSWIDE_HELP = ("NUS-WIDE is distributed by the NUS Lab for Media Search (search for \"NUS-WIDE dataset\"): "
                "ImageList/ and Groundtruth/AllLabels/ come in its ground-truth packages, the images in its image "
                "package (Flickr/<folder>/<file>.jpg); data/README.md lists the layout. Or give the lists "
                "train.txt, test.txt and database.txt (data.nuswide_source=lists).")


def load_nuswide_official(root: Path, concepts=NUSWIDE21_CONCEPTS) -> tuple[List[str], np.ndarray]:
    """Build (paths, multi-hot labels) from NUS-WIDE's own files.

    Expects ``root/ImageList/Imagelist.txt`` (one Windows-style path per line,
    e.g. ``C:\\ImageData\\Flickr\\actor\\0001_2124494179.jpg``) and
    ``root/Groundtruth/AllLabels/Labels_<concept>.txt`` (one 0/1 per line, same
    order). Images are expected under ``root/Flickr/<folder>/<file>``. Images
    carrying none of ``concepts`` are dropped (the NUS-WIDE-21 convention) and counted in the log.
    A missing file is named with what holds it; every missing concept file is listed at once.
    """
    image_list = root / "ImageList" / "Imagelist.txt"
    if not image_list.is_file():
        raise DataNotFoundError(f"NUS-WIDE image list {image_list} not found. {NUSWIDE_HELP}")
    missing = [f"Labels_{c}.txt" for c in concepts
               if not (root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt").is_file()]
    if missing:
        raise DataNotFoundError(
            f"NUS-WIDE concept files missing from {root / 'Groundtruth' / 'AllLabels'}: {len(missing)} of "
            f"{len(concepts)} ({', '.join(missing[:6])}{', ...' if len(missing) > 6 else ''}). {NUSWIDE_HELP}")
    raw = [line.strip() for line in image_list.read_text().splitlines() if line.strip()]
    paths = ["Flickr/" + "/".join(p.replace("\\", "/").split("/")[-2:]) for p in raw]
    columns = []
    for c in concepts:
        f = root / "Groundtruth" / "AllLabels" / f"Labels_{c}.txt"
        col = np.loadtxt(f, dtype=np.int64, ndmin=1)
        if len(col) != len(paths):
            raise ImageListError(f"{f} has {len(col)} lines but {image_list} has {len(paths)}; the two must "
                                 "come from the same NUS-WIDE release (one line per image, same order)")
        columns.append(col)
    labels = np.stack(columns, axis=1)
    keep = labels.sum(1) > 0
    if not keep.all():
        log.info("NUS-WIDE: dropped %d of %d images that carry none of the %d concepts", int((~keep).sum()),
                 len(keep), len(concepts))
    return [p for p, k in zip(paths, keep) if k], labels[keep]
