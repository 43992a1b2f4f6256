"""`make train DATASET=nuswide` on a folder in NUS-WIDE's own released layout, as its users meet it."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import REPO
from dsrh_lightning.data.list_source import NUSWIDE21_CONCEPTS

N = 240


def _nuswide_folder(root):
    """ImageList/Imagelist.txt, Groundtruth/AllLabels/Labels_<concept>.txt (the 21 and two others),
    Concepts81.txt and Flickr/<folder>/<id>_<flickrid>.jpg, like NUS-WIDE's packages."""
    rng = np.random.default_rng(0)
    labels = (rng.random((N, 21)) < 0.2).astype(int)
    labels[np.arange(N), rng.integers(0, 21, N)] = 1
    labels[7] = 0  # carries none of the 21 concepts: dropped and counted
    folders = [f"{NUSWIDE21_CONCEPTS[i % 21]}" for i in range(N)]
    names = [f"{i:04d}_{20000 + i}.jpg" for i in range(N)]
    (root / "ImageList").mkdir(parents=True)
    (root / "ImageList" / "Imagelist.txt").write_text(
        "".join(f"C:\\ImageData\\Flickr\\{f}\\{n}\r\n" for f, n in zip(folders, names)))
    gt = root / "Groundtruth" / "AllLabels"
    gt.mkdir(parents=True)
    for c, concept in enumerate(NUSWIDE21_CONCEPTS):
        (gt / f"Labels_{concept}.txt").write_text("".join(f"{v}\n" for v in labels[:, c]))
    for extra in ("airport", "zebra"):  # concepts outside the 21 are ignored
        (gt / f"Labels_{extra}.txt").write_text("".join(f"{v}\n" for v in rng.integers(0, 2, N)))
    (root / "Concepts81.txt").write_text("\n".join(list(NUSWIDE21_CONCEPTS) + ["airport", "zebra"]) + "\n")
    colours = rng.integers(0, 256, (21, 3))
    for i, (f, n) in enumerate(zip(folders, names)):
        d = root / "Flickr" / f
        d.mkdir(parents=True, exist_ok=True)
        pixel = (labels[i, :, None] * colours).sum(0) // max(1, labels[i].sum())
        img = np.clip(pixel + rng.normal(0, 20, (40, 48, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(d / n, quality=90)
    return labels


def _make_train(root, out, extra=()):
    args = " ".join([
        "model.backbone=small_cnn", "model.bits=12", "logger.name=none", f"output_dir={out}", "name=nw",
        "data.image_size=32", "data.num_workers=0", "data.batch_size=8", "data.eval_batch_size=64",
        "data.split_dir=", "data.sampling=random", "data.protocol.query_per_class=2",
        "data.protocol.train_per_class=4", "data.protocol.val_per_class=1", "data.protocol.val_database_size=0",
        "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.progress_bar=false", *extra])
    return subprocess.run(["make", "train", "DATASET=nuswide", f"DATA_DIR={root}", "WEIGHTS=none", f"ARGS={args}"],
                          cwd=REPO, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)


@pytest.mark.slow
def test_make_train_nuswide_official_layout(tmp_path):
    root = tmp_path / "NUS-WIDE"
    _nuswide_folder(root)
    proc = _make_train(root, tmp_path / "runs")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "runs" / "nw" / "metrics.json").read_text())
    for key in ("test/map", "test/ndcg", "test/acg", "test/wmap"):
        assert 0.0 <= metrics[key]
    assert metrics["test/map"] <= 1.0
    assert metrics["test/topk"] == min(5000, metrics["test/num_database"])  # the dataset config's MAP@5000
    assert metrics["test/num_queries"] == 42  # 2 per concept, drawn from distinct images
    assert f"dropped 1 of {N} images" in proc.stdout + proc.stderr


def test_missing_nuswide_files_are_named(tmp_path):
    root = tmp_path / "NUS-WIDE"
    _nuswide_folder(root)
    for f in ("Labels_sky.txt", "Labels_lake.txt"):
        (root / "Groundtruth" / "AllLabels" / f).unlink()
    proc = _make_train(root, tmp_path / "runs")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "Labels_sky.txt" in out and "Labels_lake.txt" in out and "2 of 21" in out and "NUS-WIDE dataset" in out
    assert not (tmp_path / "runs" / "nw").exists()
    (root / "ImageList" / "Imagelist.txt").unlink()
    proc = _make_train(root, tmp_path / "runs")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "ImageList" in out and "Imagelist.txt" in out and "data/README.md" in out


def test_a_missing_image_is_named_with_its_line(tmp_path):
    root = tmp_path / "NUS-WIDE"
    _nuswide_folder(root)
    gone = root / "Flickr" / NUSWIDE21_CONCEPTS[3] / "0003_20003.jpg"
    gone.unlink()
    proc = _make_train(root, tmp_path / "runs")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in out
    assert "0003_20003.jpg" in out
