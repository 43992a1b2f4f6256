"""Multilevel relevance, Zhao et al.'s mining and loss, the per-concept split, real NUS-WIDE-21 lists."""

import itertools
import math

import numpy as np
import pytest
import torch

from conftest import shared_data_dir
from dsrh_lightning.data.protocol import make_multilabel_split
from dsrh_lightning.data.sampling import sample_triplets
from dsrh_lightning.losses.miners import mine_multilevel_triplets
from dsrh_lightning.losses import balance_penalty, hamming_surrogate, weighted_ranking_loss
from dsrh_lightning.relevance import relevance_matrix, shared_label_counts


def test_relevance_definitions():
    single = torch.tensor([0, 1, 0])
    assert relevance_matrix(single, single).tolist() == [[True, False, True], [False, True, False],
                                                          [True, False, True]]
    multi = torch.tensor([[1, 1, 0], [0, 1, 1], [0, 0, 1]])
    assert shared_label_counts(multi, multi).tolist() == [[2, 1, 0], [1, 2, 1], [0, 1, 1]]
    assert relevance_matrix(multi, multi).tolist() == [[True, True, False], [True, True, True],
                                                        [False, True, True]]
    with pytest.raises(ValueError, match="widths differ"):
        relevance_matrix(multi, torch.ones(2, 4))


def ref_idcg(r_values):
    gains = sorted((2 ** r - 1 for r in r_values), reverse=True)
    return sum(g / math.log2(pos + 2) for pos, g in enumerate(gains))


def test_multilevel_miner_matches_brute_force():
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1], [0, 1, 0, 1]])
    q, i, j, w = mine_multilevel_triplets(labels)
    got = {(a, b, c): wt for a, b, c, wt in zip(q.tolist(), i.tolist(), j.tolist(), w.tolist())}
    r = shared_label_counts(labels, labels).tolist()
    expected = {}
    for a, b, c in itertools.product(range(5), repeat=3):
        if a in (b, c) or b == c:
            continue
        if r[a][b] > r[a][c]:
            z = ref_idcg([r[a][x] for x in range(5) if x != a])
            expected[(a, b, c)] = (2 ** r[a][b] - 2 ** r[a][c]) / z
    assert got.keys() == expected.keys()
    for key, wt in expected.items():
        assert got[key] == pytest.approx(wt, rel=1e-6)


def ref_weighted_loss(codes, q, i, j, w, margin):
    k = codes.shape[1]
    total = 0.0
    for a, b, c, wt in zip(q.tolist(), i.tolist(), j.tolist(), w.tolist()):
        ht = [[2 * codes[x, t].item() - 1 for t in range(k)] for x in (a, b, c)]
        d_ab = (k - sum(ht[0][t] * ht[1][t] for t in range(k))) / 2
        d_ac = (k - sum(ht[0][t] * ht[2][t] for t in range(k))) / 2
        total += wt * max(0.0, margin + d_ab - d_ac)
    return total / codes.shape[0]


def test_weighted_ranking_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    labels = (torch.rand(8, 5, generator=g) > 0.6).long()
    labels[:, 0] = 1 - labels[:, 1:].max(1).values * 0  # every row has label 0 -> r >= 1 everywhere
    labels[::2, 0] = 0
    codes = torch.rand(8, 6, generator=g, dtype=torch.float64)
    q, i, j, w = mine_multilevel_triplets(labels)
    assert len(q) > 0
    got = weighted_ranking_loss(codes, q, i, j, w, margin=1.5).item()
    assert got == pytest.approx(ref_weighted_loss(codes, q, i, j, w, 1.5), rel=1e-6)


def test_hamming_surrogate_is_hamming_on_binary_codes():
    a = torch.tensor([[1.0, 0, 1, 1], [0, 0, 0, 0]])
    b = torch.tensor([[1.0, 1, 0, 1], [1, 1, 1, 1]])
    assert hamming_surrogate(a, b).tolist() == [2.0, 4.0]


def test_balance_penalty():
    assert balance_penalty(torch.tensor([[1.0, 0.0], [0.0, 1.0]])).item() == 0.0
    assert balance_penalty(torch.ones(3, 4)).item() == pytest.approx(4.0)


def test_multilabel_split_per_concept():
    rng = np.random.default_rng(0)
    labels = (rng.random((600, 5)) < 0.3).astype(np.int64)
    labels[labels.sum(1) == 0, 0] = 1
    names = tuple("abcde")
    s = make_multilabel_split(labels, names, 10, 20, 5, 0, seed=1)
    assert len(s.query) == 50 and len(np.unique(s.query)) == 50
    assert len(s.train) == 100 and np.isin(s.train, s.database).all()
    assert len(np.intersect1d(s.query, s.database)) == 0 and len(s.query) + len(s.database) == 600
    # Each concept contributed its quota: every concept appears on at least that many drawn images.
    assert (labels[s.query].sum(0) >= 10).all() and (labels[s.train].sum(0) >= 20).all()
    again = make_multilabel_split(labels, names, 10, 20, 5, 0, seed=1)
    assert (again.train == s.train).all()
    with pytest.raises(ValueError, match="concept"):
        make_multilabel_split(labels, names, 300, 20, 5, 0, seed=1)


def _read_nuswide(name):
    path = shared_data_dir() / "nuswide21" / name
    if not path.is_file():
        pytest.skip(f"{path} not present (real NUS-WIDE-21 label lists)")
    rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
    return [r[0] for r in rows], np.array([r[1:] for r in rows], dtype=np.int64)


def test_real_nuswide21_lists_follow_the_protocol(tmp_path):
    from dsrh_lightning.data.image_list import read_image_list

    root = shared_data_dir() / "nuswide21"
    if not (root / "train.txt").is_file():
        pytest.skip(f"{root}/train.txt not present")
    train = read_image_list(root / "train.txt", root, num_labels=21)
    test = read_image_list(root / "test.txt", root, num_labels=21)
    assert train.labels.shape == (10500, 21) and test.labels.shape == (2100, 21)
    assert not set(train.paths) & set(test.paths)
    # At least 500 / 100 images carry each concept (the per-concept sampling of the protocol).
    assert (train.labels.sum(0) >= 500).all() and (test.labels.sum(0) >= 100).all()
    # Multilevel relevance is real: queries share up to several labels with training images.
    r = shared_label_counts(torch.as_tensor(test.labels[:200]), torch.as_tensor(train.labels))
    assert r.max() >= 4 and (r == 0).any() and (r == 1).any()
    # Our per-concept split on these real labels: 100 queries per concept as in the protocol; only 12,600
    # labelled images exist here (the real database has ~193k), so draw 250 training images per concept.
    labels = np.concatenate([train.labels, test.labels])
    s = make_multilabel_split(labels, tuple(range(21)), 100, 250, 10, 0, seed=0)
    assert len(s.query) == 2100 and len(s.train) == 5250
    assert (labels[s.query].sum(0) >= 100).all() and (labels[s.train].sum(0) >= 250).all()


def test_real_nuswide_triplets_and_mining():
    _, labels = _read_nuswide("train.txt")
    sub = labels[:300]
    trip = sample_triplets(sub, per_anchor=1, seed=0)
    rel = relevance_matrix(torch.as_tensor(sub), torch.as_tensor(sub)).numpy()
    assert rel[trip[:, 0], trip[:, 1]].all() and not rel[trip[:, 0], trip[:, 2]].any()
    q, i, j, w = mine_multilevel_triplets(torch.as_tensor(labels[:64]))
    r = shared_label_counts(torch.as_tensor(labels[:64]), torch.as_tensor(labels[:64]))
    assert (r[q, i] > r[q, j]).all() and (w > 0).all()
