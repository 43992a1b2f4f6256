"""Triplet sampling, in-batch mining and balanced batches, checked against brute force."""

import itertools

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from dsrh_lightning.data.sampling import ClassBalancedBatchSampler, sample_triplets
from dsrh_lightning.losses.miners import mine_all_triplets
from dsrh_lightning.relevance import relevance_matrix


def _check_triplets(labels, trip):
    rel = relevance_matrix(torch.as_tensor(labels), torch.as_tensor(labels)).numpy()
    a, p, n = trip.T
    assert (a != p).all(), "positive equals anchor"
    assert rel[a, p].all(), "positive not relevant"
    assert (~rel[a, n]).all(), "negative relevant"


def test_single_label_triplets_valid_seeded_and_uniform():
    labels = np.repeat(np.arange(4), 5)
    t1 = sample_triplets(labels, per_anchor=3, seed=7)
    assert t1.shape == (60, 3)
    assert (t1[:20, 0] == np.arange(20)).all()
    _check_triplets(labels, t1)
    assert (t1 == sample_triplets(labels, 3, seed=7)).all()
    assert not (t1 == sample_triplets(labels, 3, seed=8)).all()
    # Over many draws every valid positive and negative of anchor 0 appears.
    many = sample_triplets(labels, per_anchor=400, seed=0)
    a0 = many[many[:, 0] == 0]
    assert set(a0[:, 1]) == {1, 2, 3, 4}
    assert set(a0[:, 2]) == set(range(5, 20))


def test_triplets_with_unsorted_unequal_classes():
    rng = np.random.default_rng(0)
    labels = rng.permutation(np.array([0] * 2 + [5] * 7 + [9] * 3))
    _check_triplets(labels, sample_triplets(labels, per_anchor=50, seed=1))


def test_multilabel_triplets_valid():
    labels = np.array([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]])
    _check_triplets(labels, sample_triplets(labels, per_anchor=20, seed=0))


def test_triplet_sampling_errors_name_the_problem():
    with pytest.raises(ValueError, match="at least 2"):
        sample_triplets(np.array([0, 0, 1]), 1, 0)
    with pytest.raises(ValueError, match="2 classes"):
        sample_triplets(np.array([3, 3, 3]), 1, 0)
    with pytest.raises(ValueError, match="no positive"):
        sample_triplets(np.array([[1, 0], [0, 1], [0, 1]]), 1, 0)


def brute_force_triplets(labels):
    rel = relevance_matrix(labels, labels)
    b = len(labels)
    return {(a, p, n) for a, p, n in itertools.product(range(b), repeat=3) if a != p and rel[a, p] and not rel[a, n]}


@pytest.mark.parametrize("labels", [
    torch.tensor([0, 0, 1, 1, 2, 0]),
    torch.tensor([[1, 0, 1], [1, 0, 0], [0, 1, 0], [0, 1, 1], [0, 0, 1]]),
])
def test_miner_returns_exactly_all_valid_triplets(labels):
    a, p, n = mine_all_triplets(labels)
    got = set(zip(a.tolist(), p.tolist(), n.tolist()))
    assert got == brute_force_triplets(labels)
    assert len(got) == len(a)


def test_miner_cap_keeps_a_subset():
    labels = torch.arange(8).repeat_interleave(4)
    a, p, n = mine_all_triplets(labels, max_triplets=50, generator=torch.Generator().manual_seed(0))
    assert len(a) == 50
    full = brute_force_triplets(labels)
    assert set(zip(a.tolist(), p.tolist(), n.tolist())) <= full


def test_balanced_batches():
    labels = np.repeat(np.arange(10), 30)
    s = ClassBalancedBatchSampler(labels, batch_size=32, images_per_class=8, seed=3)
    batches = list(s)
    assert len(batches) == len(s) == 300 // 32
    for b in batches:
        counts = np.bincount(labels[b], minlength=10)
        assert sorted(counts[counts > 0].tolist()) == [8, 8, 8, 8]
        assert len(set(b)) == 32
    assert batches == list(ClassBalancedBatchSampler(labels, 32, 8, seed=3))
    s.set_epoch(1)
    assert list(s) != batches
    # Two ranks see disjoint batches of the same epoch.
    r0 = list(ClassBalancedBatchSampler(labels, 32, 8, seed=3, rank=0, world_size=2))
    r1 = list(ClassBalancedBatchSampler(labels, 32, 8, seed=3, rank=1, world_size=2))
    assert len(r0) == len(r1) and all(x != y for x, y in zip(r0, r1))


def test_real_nuswide_labels_give_valid_multilabel_triplets():
    path = shared_data_dir() / "nuswide21" / "train.txt"
    if not path.is_file():
        pytest.skip(f"{path} not present (real NUS-WIDE-21 label list)")
    rows = [line.split()[1:] for line in path.read_text().splitlines()[:400]]
    labels = np.array(rows, dtype=np.int64)
    assert labels.shape == (400, 21)
    trip = sample_triplets(labels, per_anchor=2, seed=0)
    _check_triplets(labels, trip)
