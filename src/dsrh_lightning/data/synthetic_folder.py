"""Write a seeded synthetic image data set in the list-file layout (NUS-WIDE style).

Used by the tests and for trying ``dataset=nuswide`` / ``dataset=custom`` without
the real images: ``root/images/<i>.png`` plus ``train.txt``, ``test.txt`` and
``database.txt`` lines ``images/<i>.png 0 1 0 ...`` (or ``images/<i>.png <class>``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import numpy as np

__all__ = ["make_synthetic_multilabel", "write_synthetic_list_dataset"]


def make_synthetic_multilabel(num_labels: int = 6, n: int = 300, image_size: int = 32, seed: int = 0):
    """Images whose content mixes the prototypes of their labels.

    Returns ``(images (n, s, s, 3) uint8, labels (n, num_labels) int64)``; each
    image has 1 to 3 labels, drawn with a skewed frequency like real tag data.
    """
    rng = np.random.default_rng(seed)
    low = 4
    coarse = rng.uniform(0, 1, size=(num_labels, low, low, 3))
    reps = int(np.ceil(image_size / low))
    protos = np.repeat(np.repeat(coarse, reps, axis=1), reps, axis=2)[:, :image_size, :image_size]
    freq = np.linspace(2.0, 1.0, num_labels)
    freq /= freq.sum()
    labels = np.zeros((n, num_labels), dtype=np.int64)
    for i in range(n):
        k = rng.integers(1, 4)
        labels[i, rng.choice(num_labels, size=min(k, num_labels), replace=False, p=freq)] = 1
    mix = (labels[:, :, None, None, None] * protos[None]).sum(1) / labels.sum(1)[:, None, None, None]
    images = mix + rng.normal(0, 0.1, size=mix.shape)
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8), labels


def write_synthetic_list_dataset(root: Path, num_labels: int = 6, n: int = 300, query: int = 40, train: int = 120,
                                 multilabel: bool = True, seed: int = 0) -> Dict[str, Path]:
    """Write images and three list files under ``root``; returns the list paths.

    The database is everything but the queries; the training images are drawn
    from the database (the NUS-WIDE convention).
    """
    from PIL import Image

    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    images, labels = make_synthetic_multilabel(num_labels, n, seed=seed)
    if not multilabel:
        labels = labels.argmax(1)
    rng = np.random.default_rng(seed + 1)
    order = rng.permutation(n)
    q_idx, db_idx = order[:query], order[query:]
    tr_idx = db_idx[:train]
    rel = []
    for i, img in enumerate(images):
        path = f"images/{i:05d}.png"
        Image.fromarray(img).save(root / path)
        rel.append(path)

    def line(i: int) -> str:
        lab = labels[i]
        return f"{rel[i]} " + (" ".join(str(int(v)) for v in lab) if multilabel else str(int(lab)))

    out = {}
    for name, idx in (("train", tr_idx), ("test", q_idx), ("database", db_idx)):
        out[name] = root / f"{name}.txt"
        out[name].write_text("\n".join(line(i) for i in idx) + "\n")
    return out
