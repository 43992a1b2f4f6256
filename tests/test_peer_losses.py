"""Peer deep-hashing losses against loop-based references, and their config wiring."""

import math

import numpy as np
import pytest
import torch

from dsrh_lightning.config import ConfigError, load_config
from dsrh_lightning.losses.peers import (csq_centers, csq_loss, csq_targets, dpsh_loss, dtsh_loss, hadamard,
                                         hashnet_loss, hashnet_scale, quantization_penalty)


def _softplus(x):
    return math.log1p(math.exp(x)) if x < 30 else x


def _sign(x):
    return 1.0 if x >= 0 else -1.0


def _quant_ref(u):
    return sum(sum((u[i][k] - _sign(u[i][k])) ** 2 for k in range(len(u[i]))) for i in range(len(u))) / len(u)


def _data(b=7, k=6, seed=0, multilabel=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(b, k, generator=g, dtype=torch.float64) * 2 - 1
    if multilabel:
        labels = (torch.rand(b, 4, generator=g) > 0.5).long()
        labels[:, 0] = 1 - labels[:, 1:].max(1).values * 0  # keep rows non-empty
    else:
        labels = torch.randint(0, 3, (b,), generator=g)
    return u, labels


def _rel(labels, i, j):
    if labels.ndim == 1:
        return float(labels[i] == labels[j])
    return float((labels[i] * labels[j]).sum() > 0)


@pytest.mark.parametrize("multilabel", [False, True])
def test_dpsh_matches_loop(multilabel):
    u, labels = _data(multilabel=multilabel)
    ul = u.tolist()
    terms = []
    for i in range(len(ul)):
        for j in range(len(ul)):
            if i != j:
                theta = 0.5 * sum(a * b for a, b in zip(ul[i], ul[j]))
                terms.append(_softplus(theta) - _rel(labels, i, j) * theta)
    ref = sum(terms) / len(terms) + 0.3 * _quant_ref(ul)
    assert math.isclose(dpsh_loss(u, labels, 0.3).item(), ref, rel_tol=1e-5)


def test_dtsh_matches_loop_and_empty_triplets():
    u, _ = _data(b=6)
    a, p, n = torch.tensor([0, 1, 2, 0]), torch.tensor([3, 4, 5, 4]), torch.tensor([1, 2, 3, 5])
    ul = u.tolist()
    terms = []
    for x, y, z in zip(a.tolist(), p.tolist(), n.tolist()):
        tp = 0.5 * sum(q * r for q, r in zip(ul[x], ul[y]))
        tn = 0.5 * sum(q * r for q, r in zip(ul[x], ul[z]))
        d = tp - tn - 2.0
        terms.append(-(d - _softplus(d)))
    ref = sum(terms) / len(terms) + 0.5 * _quant_ref(ul)
    assert math.isclose(dtsh_loss(u, a, p, n, 2.0, 0.5).item(), ref, rel_tol=1e-5)
    empty = torch.zeros(0, dtype=torch.long)
    assert math.isclose(dtsh_loss(u, empty, empty, empty, 2.0, 0.5).item(), 0.5 * _quant_ref(ul), rel_tol=1e-5)


@pytest.mark.parametrize("multilabel", [False, True])
def test_hashnet_matches_loop(multilabel):
    u, labels = _data(b=8, multilabel=multilabel, seed=3)
    ul, k = u.tolist(), u.shape[1]
    alpha = 10.0 / k
    pairs = [(i, j) for i in range(len(ul)) for j in range(len(ul)) if i != j]
    s = [_rel(labels, i, j) for i, j in pairs]
    n1 = sum(s)
    n0 = len(s) - n1
    total = 0.0
    for (i, j), sij in zip(pairs, s):
        ip = alpha * sum(a * b for a, b in zip(ul[i], ul[j]))
        w = len(s) / n1 if sij > 0 else len(s) / n0
        total += w * (_softplus(ip) - sij * ip)
    assert math.isclose(hashnet_loss(u, labels).item(), total / len(s), rel_tol=1e-5)


def test_hashnet_weights_balance_similar_and_dissimilar_pairs():
    # With all codes equal, every pair has the same inner product; the loss is then the mean loss of a
    # similar pair plus that of a dissimilar pair, however unequal their counts (here 2 vs 28 ordered pairs).
    h = torch.full((6, 4), 0.5)
    labels = torch.tensor([0, 0, 1, 2, 3, 4])
    ip = 10.0 / 4 * 4 * 0.25
    expected = (_softplus(ip) - ip) + _softplus(ip)
    assert math.isclose(hashnet_loss(h, labels).item(), expected, rel_tol=1e-5)


def test_hashnet_scale_continuation():
    assert hashnet_scale(0) == 1.0
    assert math.isclose(hashnet_scale(200), math.sqrt(2.0))
    assert hashnet_scale(1000) > hashnet_scale(999)


def test_hadamard_and_csq_centres():
    h = hadamard(16)
    assert np.array_equal(h @ h.T, 16 * np.eye(16))
    with pytest.raises(ValueError):
        hadamard(12)
    c = csq_centers(10, 16)  # power of two: exactly bits/2 apart
    d = (16 - c @ c.T) / 2
    assert torch.all(d[~torch.eye(10, dtype=torch.bool)] == 8)
    for bits in (12, 24, 48):
        c = csq_centers(10, bits)
        d = (bits - c @ c.T) / 2
        off = d[~torch.eye(10, dtype=torch.bool)]
        assert c.shape == (10, bits) and set(c.unique().tolist()) == {-1.0, 1.0}
        assert off.min() >= bits / 4, (bits, off.min())  # distinct, well separated
    with pytest.raises(ValueError, match="classes"):
        csq_centers(40, 12)


def test_csq_matches_loop_single_and_multilabel():
    u, labels = _data(b=5, k=8, seed=1)
    centers = csq_centers(3, 8)
    ul = u.tolist()
    total = 0.0
    for i in range(len(ul)):
        c = centers[int(labels[i])].tolist()
        for k in range(8):
            p, t = (ul[i][k] + 1) / 2, (c[k] + 1) / 2
            total -= t * math.log(p) + (1 - t) * math.log(1 - p)
    q = sum((abs(x) - 1) ** 2 for row in ul for x in row) / (5 * 8)
    ref = total / (5 * 8) + 0.2 * q
    assert math.isclose(csq_loss(u, labels, centers, 0.2).item(), ref, rel_tol=1e-5)
    multi = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 1]])
    t = csq_targets(multi, centers)
    assert torch.equal(t[0], centers[0])
    assert torch.equal(t[1], torch.where(centers[0] + centers[1] >= 0, 1.0, -1.0))


def test_losses_are_lowest_for_codes_that_respect_labels():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[1., 1, 1, 1], [1, 1, 1, 1], [-1, -1, -1, -1], [-1, -1, -1, -1]]) * 0.99
    bad = good[[0, 2, 1, 3]]
    assert dpsh_loss(good, labels) < dpsh_loss(bad, labels)
    assert hashnet_loss(good, labels) < hashnet_loss(bad, labels)
    a, p, n = torch.tensor([0, 2]), torch.tensor([1, 3]), torch.tensor([2, 0])
    assert dtsh_loss(good, a, p, n) < dtsh_loss(bad, a, p, n)
    # csq: codes at their class centres beat codes at the wrong centres
    centers = csq_centers(2, 4)
    at = centers[labels] * 0.99
    assert csq_loss(at, labels, centers) < csq_loss(at[[2, 3, 0, 1]], labels, centers)
    assert quantization_penalty(torch.ones(3, 4)) == 0


PEERS = ["dpsh", "dtsh", "hashnet", "csq", "greedyhash", "orthohash", "dsh", "dhn"]


@pytest.mark.parametrize("method", PEERS)
def test_peer_experiment_configs_load(method):
    cfg = load_config(["dataset=synthetic", f"experiment={method}"])
    assert cfg.loss.ranking == method and cfg.loss.cls_weight == 0 and not cfg.model.classifier
    with pytest.raises(ConfigError, match="loss.ranking"):
        load_config(["dataset=synthetic", "loss.ranking=dpshh"])


@pytest.mark.parametrize("method", PEERS)
@pytest.mark.parametrize("sampling", ["triplets", "balanced"])
def test_module_trains_peer_loss_on_features(method, sampling):
    """Through HashingModule.training_step (no Trainer): finite loss, gradients reach the hash head,
    and a few SGD steps on separable features lower the loss."""
    from dsrh_lightning.lightning.module import HashingModule
    from dsrh_lightning.config import to_dict

    over = ["dataset=synthetic", f"experiment={method}", f"data.sampling={sampling}", "model.bits=8",
            "model.bag_size=4", "model.dropout=0", "data.batch_size=12", "data.images_per_class=3"]
    cfg = load_config(over)
    torch.manual_seed(0)
    module = HashingModule(to_dict(cfg), num_classes=4, feature_dim=10)
    protos = torch.randn(4, 10) * 3
    if sampling == "triplets":
        lab = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 2, 3], [3, 3, 0]] * 3)
    else:
        lab = torch.arange(4).repeat_interleave(3)
    x = protos[lab] + 0.1 * torch.randn(*lab.shape, 10)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    for step in range(25):
        opt.zero_grad()
        loss = module.training_step((x, lab), step)
        assert torch.isfinite(loss)
        loss.backward()
        if step == 0:
            assert module.net.hash_head.fc.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
