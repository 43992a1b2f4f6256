"""Protocol splits: per-class counts, disjointness, seeding, caching; the real CIFAR-10 file."""

import numpy as np
import pytest

from conftest import shared_data_dir
from dsrh_lightning.data.protocol import load_or_make_split, make_single_label_split
from dsrh_lightning.data.sources import DataNotFoundError, load_cifar10, make_synthetic

NAMES = tuple(f"c{i}" for i in range(5))


def _split(labels, seed=0, **kw):
    params = dict(query_per_class=3, train_per_class=6, val_per_class=2, val_database_size=0, seed=seed)
    params.update(kw)
    return make_single_label_split(labels, NAMES, **params)


def test_split_counts_and_disjointness():
    labels = np.repeat(np.arange(5), 20)
    s = _split(labels)
    assert (np.bincount(labels[s.query]) == 3).all()
    assert (np.bincount(labels[s.train]) == 6).all()
    assert (np.bincount(labels[s.val]) == 2).all()
    assert len(np.intersect1d(s.query, s.database)) == 0
    assert len(np.union1d(s.query, s.database)) == 100
    assert np.isin(s.train, s.database).all()
    assert np.isin(s.val, s.database).all() and len(np.intersect1d(s.val, s.train)) == 0
    assert len(np.intersect1d(s.val, s.val_database)) == 0 and len(np.intersect1d(s.query, s.val_database)) == 0
    assert len(s.val_database) == 100 - 15 - 10


def test_split_is_seeded():
    labels = np.repeat(np.arange(5), 20)
    assert (_split(labels, 1).query == _split(labels, 1).query).all()
    assert not (_split(labels, 1).query == _split(labels, 2).query).all()


def test_val_database_subset_size():
    labels = np.repeat(np.arange(5), 20)
    assert len(_split(labels, val_database_size=30).val_database) == 30


def test_too_few_images_and_empty_class_are_errors():
    labels = np.repeat(np.arange(5), 20)
    with pytest.raises(ValueError, match="class 0"):
        _split(labels, train_per_class=20)
    labels = np.array([0] * 20 + [1] * 20 + [3] * 20)  # class 2 empty
    with pytest.raises(ValueError, match="c2"):
        make_single_label_split(labels, NAMES[:4], 1, 1, 1, 0, 0)


def test_split_cache_round_trip(tmp_path):
    labels = np.repeat(np.arange(5), 20)
    params = dict(query_per_class=3, train_per_class=6, val_per_class=2, val_database_size=0, seed=0)
    calls = []

    def make():
        calls.append(1)
        return make_single_label_split(labels, NAMES, **params)

    a = load_or_make_split(make, "toy", labels, params, tmp_path)
    b = load_or_make_split(make, "toy", labels, params, tmp_path)
    assert len(calls) == 1 and len(list(tmp_path.glob("toy-*.npz"))) == 1
    assert all((getattr(a, k) == getattr(b, k)).all() for k in ("query", "database", "train", "val", "val_database"))


def test_synthetic_source_is_seeded_and_structured():
    a, b = make_synthetic(4, 10, 16, seed=0), make_synthetic(4, 10, 16, seed=0)
    assert a.images.shape == (40, 16, 16, 3) and a.images.dtype == np.uint8
    assert (a.images == b.images).all()
    # Same-class images are closer on average than different-class images.
    x = a.images.reshape(40, -1).astype(np.float32)
    d = ((x[:, None] - x[None]) ** 2).mean(-1)
    same = a.labels[:, None] == a.labels[None]
    assert d[same & ~np.eye(40, dtype=bool)].mean() < d[~same].mean()


def test_missing_cifar_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_cifar10(tmp_path / "nowhere", download=False)
    msg = str(err.value)
    assert "nowhere" in msg and "cifar10.npz" in msg and "data.root" in msg


def test_npz_with_missing_keys_is_an_error(tmp_path):
    np.savez(tmp_path / "cifar10.npz", x_train=np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="y_train"):
        load_cifar10(tmp_path, download=False)


def test_real_cifar10_paper_protocol():
    path = shared_data_dir() / "cifar10"
    if not (path / "cifar10.npz").is_file():
        pytest.skip(f"{path}/cifar10.npz not present (real CIFAR-10)")
    src = load_cifar10(path, download=False)
    assert src.images.shape == (60000, 32, 32, 3) and src.num_classes == 10
    s = make_single_label_split(src.labels, src.class_names, 100, 500, 50, 5000, seed=0)
    assert len(s.query) == 1000 and len(s.database) == 59000 and len(s.train) == 5000
    assert (np.bincount(src.labels[s.query], minlength=10) == 100).all()
    assert (np.bincount(src.labels[s.train], minlength=10) == 500).all()
    assert len(s.val) == 500 and len(s.val_database) == 5000
    assert len(np.intersect1d(s.query, s.database)) == 0


def test_database_order_does_not_follow_the_source_order():
    """Ties are broken by database position; a class-sorted source must not leak labels through it."""
    labels = np.repeat(np.arange(5), 40)  # class-sorted, like cifar10.npz
    s = _split(labels, val_database_size=50)
    for db in (s.database, s.val_database):
        assert not (np.diff(db) > 0).all(), "database kept the source order"
        # Classes are interleaved: the first quarter of the order holds images of every class.
        assert len(np.unique(labels[db[: len(db) // 4]])) == 5
    again = _split(labels, val_database_size=50)
    assert (again.database == s.database).all() and (again.val_database == s.val_database).all()


def test_class_sorted_source_gives_unbiased_map_for_collapsed_codes():
    """All-identical codes must score chance-level MAP, whatever the order of the source rows."""
    import torch

    from dsrh_lightning.metrics import retrieval_metrics

    labels = np.repeat(np.arange(5), 40)
    s = _split(labels)
    codes_q = torch.zeros(len(s.query), 8, dtype=torch.uint8)
    codes_db = torch.zeros(len(s.database), 8, dtype=torch.uint8)
    m = retrieval_metrics(codes_q, codes_db, torch.as_tensor(labels[s.query]), torch.as_tensor(labels[s.database]))
    # Class-sorted database order would give class-0 queries AP ~1 and a mean far above 0.2.
    assert abs(m["map"] - 0.2) < 0.06, m["map"]
