"""dataset=cifar10_multilabel: multi-label mosaics of real CIFAR-10 tiles, NUS-WIDE-21's label statistics."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import shared_data_dir
from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import load_source, make_split
from dsrh_lightning.data.mosaic import NUSWIDE21_LABEL_COUNTS, label_count_distribution, make_mosaics
from dsrh_lightning.data.sources import load_cifar10

CIFAR = shared_data_dir() / "cifar10"
NUSWIDE = shared_data_dir() / "nuswide21"


@pytest.fixture(scope="module")
def cifar():
    return load_cifar10(CIFAR, download=False)


@pytest.fixture(scope="module")
def mosaics(cifar):
    return make_mosaics(cifar.images, cifar.labels, cifar.class_names, grid=2, seed=0, return_tiles=True)


def _nuswide_label_counts() -> np.ndarray:
    rows = [line.split()[1:] for name in ("train.txt", "test.txt") for line in (NUSWIDE / name).read_text().splitlines()]
    return label_count_distribution(np.array(rows, dtype=np.int64))


def test_label_count_table_is_nuswide21s():
    real = _nuswide_label_counts()
    assert len(real) == len(NUSWIDE21_LABEL_COUNTS)
    assert np.allclose(real, NUSWIDE21_LABEL_COUNTS, atol=1e-5)


def test_mosaics_are_real_tiles_used_once_with_their_classes(cifar, mosaics):
    source, tiles = mosaics
    assert source.images.shape == (15000, 64, 64, 3) and source.labels.shape == (15000, 10)
    assert len(np.unique(tiles)) == tiles.size  # every CIFAR-10 image is a tile at most once
    for m in (0, 1234, 14999):  # pixels: tile (r, c) of mosaic m is CIFAR-10 image tiles[m, 2r + c]
        for pos in range(4):
            r, c = divmod(pos, 2)
            assert np.array_equal(source.images[m, 32 * r:32 * r + 32, 32 * c:32 * c + 32], cifar.images[tiles[m, pos]])
    # labels: exactly the classes of the tiles
    expected = np.zeros_like(source.labels)
    for m in range(len(tiles)):
        expected[m, cifar.labels[tiles[m]]] = 1
    assert np.array_equal(source.labels, expected)


def test_label_statistics_match_nuswide21(mosaics):
    source, _ = mosaics
    got = label_count_distribution(source.labels)
    real = _nuswide_label_counts()
    folded = np.append(real[:3], real[3:].sum())  # four tiles: 4 or more labels become 4
    assert len(got) == 4 and np.abs(got - folded).max() < 0.02  # within 2 points of NUS-WIDE-21
    assert abs(source.labels.sum(1).mean() - (folded * np.arange(1, 5)).sum()) < 0.05
    assert source.labels.sum(0).min() > 0.9 * source.labels.sum(0).max()  # classes used about evenly


def test_deterministic_from_the_seed(cifar, mosaics):
    again = make_mosaics(cifar.images, cifar.labels, cifar.class_names, seed=0, count=50)
    other = make_mosaics(cifar.images, cifar.labels, cifar.class_names, seed=1, count=50)
    assert np.array_equal(again.images, mosaics[0].images[:50]) and np.array_equal(again.labels, mosaics[0].labels[:50])
    assert not np.array_equal(other.labels, again.labels)


def test_no_tile_in_both_a_query_and_a_database_image(tmp_path, mosaics):
    cfg = load_config(["dataset=cifar10_multilabel", f"data.root={CIFAR}", "data.split_dir="])
    source, partition = load_source(cfg.data, seed=cfg.seed)
    split = make_split(source, partition, cfg.data)
    _, tiles = mosaics
    assert np.array_equal(source.labels, mosaics[0].labels)
    assert len(split.query) == 1000 and len(split.train) == 5000 and len(split.database) == 15000 - 1000
    assert np.intersect1d(tiles[split.query].ravel(), tiles[split.database].ravel()).size == 0
    assert set(split.train) <= set(split.database) and not set(split.val) & set(split.train)
    per_class = source.labels[split.query].sum(0)
    assert per_class.min() >= 100  # at least 100 queries carry each class


def test_bad_requests_are_named():
    images = np.zeros((20, 4, 4, 3), np.uint8)
    labels = np.arange(20) % 2
    with pytest.raises(ValueError, match="at most 2 mosaics"):
        make_mosaics(images, labels, ("a", "b"), grid=3, count=3)
    with pytest.raises(ValueError, match="uint8"):
        make_mosaics(images.astype(np.float32), labels, ("a", "b"))
    small = make_mosaics(images, labels, ("a", "b"), grid=2)
    assert small.images.shape == (5, 8, 8, 3) and small.labels.sum(1).min() >= 1
    nine = make_mosaics(np.zeros((18, 4, 4, 3), np.uint8), np.arange(18) % 3, ("a", "b", "c"), grid=3)
    assert nine.images.shape == (2, 12, 12, 3)


@pytest.mark.slow
def test_trains_and_reports_multilevel_metrics(tmp_path, capsys):
    from dsrh_lightning.runs.train import train

    cfg = load_config([
        "dataset=cifar10_multilabel", f"data.root={CIFAR}", "data.split_dir=", f"output_dir={tmp_path}", "name=ml",
        "model.backbone=small_cnn", "model.weights=none", "model.bits=12", "logger.name=none",
        "data.sampling=random", "loss.ranking=weighted", "data.batch_size=16", "data.num_workers=0",
        "data.protocol.query_per_class=5", "data.protocol.train_per_class=10", "data.protocol.val_per_class=3",
        "data.protocol.val_database_size=200", "trainer.max_steps=4", "trainer.val_check_interval=4",
        "trainer.progress_bar=false", "eval.topk=100", "eval.ndcg_k=20", "eval.acg_k=20", "eval.wmap_topk=100",
        "trainer.test_after_fit=false",
    ])
    out = train(cfg)
    saved = json.loads((tmp_path / "ml" / "metrics.json").read_text())
    for key in ("val/map", "val/ndcg", "val/acg", "val/wmap"):
        assert 0.0 <= out[key] <= max(1.0, out[key]) and saved[key] == pytest.approx(out[key])
    assert out["val/acg"] > 0  # multilevel relevance: shared-label counts, not 0/1


def test_labels_outside_the_class_names_are_refused_up_front():
    """A label >= len(class_names) (or < 0) was silently never used as a tile: refused, naming the range."""
    images = np.zeros((20, 4, 4, 3), np.uint8)
    for labels in (np.arange(20) % 3, np.where(np.arange(20) == 7, -1, np.arange(20) % 2)):
        with pytest.raises(ValueError, match=r"class ids in \[0, 2\) \(2 class names\)") as info:
            make_mosaics(images, labels, ("a", "b"), grid=2)
        first = int(np.flatnonzero((labels < 0) | (labels >= 2))[0])
        assert f"label {labels[first]} of tile {first}" in str(info.value)
    with pytest.raises(ValueError, match=r"one class id per tile, shape \(20,\)"):
        make_mosaics(images, np.arange(19) % 2, ("a", "b"), grid=2)
    # in range: every tile is used once (20 tiles, 5 mosaics of 4)
    source, tiles = make_mosaics(images, np.arange(20) % 2, ("a", "b"), grid=2, return_tiles=True)
    assert sorted(tiles.ravel().tolist()) == list(range(20))
