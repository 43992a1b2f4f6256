"""GreedyHash, OrthoHash, DSH and DHN: each against a slow loop reference written from its paper's equations,
and against the reference implementation it is usually compared with, on fixed inputs. The reference
formulas below are transcribed (as formulas) from swuxyj/DeepHash-pytorch (GreedyHash.py, DSH.py, DHN.py)
and kamwoh/orthohash (functions/loss/orthohash.py, models/alexnet.py); where a convention differs, the
loss's docstring says so and the test converts."""

import math

import pytest
import torch
import torch.nn.functional as F

from dsrh_lightning.losses.dhn import DHN, dhn_loss
from dsrh_lightning.losses.dsh import DSH, dsh_loss
from dsrh_lightning.losses.greedyhash import GreedyHash, greedy_sign, greedyhash_loss
from dsrh_lightning.losses.orthohash import OrthoHash, bernoulli_codebook, orthohash_loss


def _single():
    torch.manual_seed(0)
    return torch.randn(9, 6) * 1.5, torch.tensor([0, 1, 2, 0, 1, 2, 0, 3, 3])


def _multi():
    torch.manual_seed(1)
    labels = (torch.rand(9, 4) < 0.4).long()
    labels[labels.sum(1) == 0, 0] = 1
    return torch.randn(9, 6) * 1.5, labels


def _similar(labels, i, j):
    if labels.ndim == 1:
        return float(labels[i] == labels[j])
    return float(bool((labels[i] * labels[j]).sum() > 0))


def _onehot(labels, c):
    return F.one_hot(labels, c).float() if labels.ndim == 1 else labels.float()


# ---------------------------------------------------------------- GreedyHash

def _greedy_loop(u, labels, w, alpha):
    """Paper: CE(W^T sgn(u), y) + alpha * || |u| - 1 ||_3^3 / (b k); multi-hot: BCE on the same logits."""
    u, w = u.double(), w.double()
    b, k = u.shape
    total = 0.0
    for i in range(b):
        code = torch.tensor([1.0 if x > 0 else -1.0 for x in u[i]], dtype=torch.float64)
        logits = [float(w[c] @ code) for c in range(w.shape[0])]
        if labels.ndim == 1:
            total += math.log(sum(math.exp(z) for z in logits)) - logits[int(labels[i])]
        else:
            total += sum(math.log1p(math.exp(z)) - float(labels[i, c]) * z for c, z in enumerate(logits)) / len(logits)
    penalty = sum(abs(abs(float(x)) - 1) ** 3 for x in u.flatten()) / (b * k)
    return total / b + alpha * penalty


@pytest.mark.parametrize("data", [_single, _multi], ids=["single", "multi"])
def test_greedyhash_matches_loop(data):
    u, labels = data()
    fc = torch.nn.Linear(6, 4, bias=False)
    got = greedyhash_loss(u, labels, fc, 0.1)
    assert got.item() == pytest.approx(_greedy_loop(u, labels, fc.weight.detach(), 0.1), rel=1e-5)


def test_greedyhash_matches_the_reference_implementation():
    """DeepHash-pytorch: b = sign(u); CE(fc(b), argmax(onehot)) + alpha * |(|u| - 1)^3|.mean()."""
    u, labels = _single()
    fc = torch.nn.Linear(6, 4, bias=False)
    ref = F.cross_entropy(fc(u.sign()), _onehot(labels, 4).argmax(1)) + 0.1 * (u.abs() - 1).pow(3).abs().mean()
    assert torch.allclose(greedyhash_loss(u, labels, fc, 0.1), ref, rtol=1e-6)


def test_greedy_sign_is_exact_forward_and_straight_through_backward():
    u = torch.tensor([[-2.0, -0.3, 0.0, 0.7, 1e-8]], requires_grad=True)
    b = greedy_sign(u)
    assert b.tolist() == [[-1.0, -1.0, -1.0, 1.0, 1.0]]  # u > 0 -> 1, the evaluation's binarisation
    (b * torch.arange(5.0)).sum().backward()
    assert u.grad.tolist() == [[0.0, 1.0, 2.0, 3.0, 4.0]]  # the gradient passes through unchanged
    # Through the whole loss: du = dL/db from the classifier + the penalty's own gradient.
    torch.manual_seed(2)
    u = torch.randn(5, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss = GreedyHash(bits=6, num_classes=4, quant_weight=0.3)
    loss(u, labels).loss.backward()
    leaf = torch.where(u > 0, 1.0, -1.0).requires_grad_(True)
    F.cross_entropy(loss.fc(leaf), labels).backward()
    v = u.detach().clone().requires_grad_(True)
    (0.3 * (v.abs() - 1).abs().pow(3).mean()).backward()
    assert torch.allclose(u.grad, leaf.grad + v.grad, atol=1e-7)
    assert loss.fc.weight.grad is not None  # the classifier on the codes trains with the heads


# ---------------------------------------------------------------- OrthoHash

def _ortho_loop(v, labels, codebook, s, m, lam):
    v, codebook = v.double(), codebook.double()
    b, c = v.shape[0], codebook.shape[0]
    total = 0.0
    for i in range(b):
        cos = [float(v[i] @ codebook[j] / (v[i].norm() * codebook[j].norm())) for j in range(c)]
        if labels.ndim == 1:
            target = [1.0 if j == int(labels[i]) else 0.0 for j in range(c)]
        else:
            n = float(labels[i].sum())
            target = [float(labels[i, j]) / n for j in range(c)]
        logits = [s * (cos[j] - m * (1.0 if target[j] > 0 else 0.0)) for j in range(c)]
        lse = math.log(sum(math.exp(z) for z in logits))
        total += sum(t * (lse - z) for t, z in zip(target, logits))
        sgn = torch.tensor([1.0 if x > 0 else -1.0 for x in v[i]], dtype=torch.float64)
        total += lam * (1 - float(v[i] @ sgn / (v[i].norm() * sgn.norm())))
    return total / b


@pytest.mark.parametrize("data", [_single, _multi], ids=["single", "multi"])
def test_orthohash_matches_loop(data):
    v, labels = data()
    codebook = bernoulli_codebook(4, 6, seed=3)
    got = orthohash_loss(v, labels, codebook, 8.0, 0.2, 0.5)
    assert got.item() == pytest.approx(_ortho_loop(v, labels, codebook, 8.0, 0.2, 0.5), rel=1e-5)


@pytest.mark.parametrize("data", [_single, _multi], ids=["single", "multi"])
def test_orthohash_matches_the_reference_implementation(data):
    """kamwoh/orthohash: CosSim logits = normalize(v) @ normalize(C)^T; cos margin s * (logits - m * y);
    CE (single-label) or label smoothing -(y / sum y) . log_softmax (multi-label); quan 'cs'
    1 - cosine_similarity(v, sign(v)), averaged."""
    v, labels = data()
    codebook = bernoulli_codebook(4, 6, seed=3)
    y = _onehot(labels, 4)
    logits = (v / v.norm(dim=1, keepdim=True)) @ (codebook / codebook.norm(dim=1, keepdim=True)).T
    margin_logits = 8.0 * (logits - 0.2 * y)
    if labels.ndim == 1:
        ce = F.cross_entropy(margin_logits, labels)
    else:
        ce = (-(y / y.sum(1, keepdim=True)) * F.log_softmax(margin_logits, dim=1)).sum(1).mean()
    quan = (1.0 - F.cosine_similarity(v, v.sign(), dim=1)).mean()
    assert torch.allclose(orthohash_loss(v, labels, codebook, 8.0, 0.2, 0.3), ce + 0.3 * quan, rtol=1e-5)


def test_orthohash_codebook_is_a_seeded_buffer():
    a, b = OrthoHash(bits=64, num_classes=10), OrthoHash(bits=64, num_classes=10)
    assert torch.equal(a.codebook, b.codebook) and set(a.codebook.unique().tolist()) == {-1.0, 1.0}
    assert not torch.equal(a.codebook, OrthoHash(bits=64, num_classes=10, codebook_seed=1).codebook)
    assert "codebook" in dict(a.named_buffers())
    # Near-orthogonal: at 64 bits, distinct codes agree on about half their bits.
    cos = a.codebook @ a.codebook.T / 64
    off = cos[~torch.eye(10, dtype=torch.bool)]
    assert off.abs().mean() < 0.2


# ---------------------------------------------------------------- DSH

def _dsh_loop(u, labels, m, alpha):
    """Paper over ordered pairs i != j: 1/2 s d + 1/2 (1 - s) max(m - d, 0), averaged; regulariser
    alpha * || |b_i| - 1 ||_1 averaged over images."""
    u = u.double()
    b = len(u)
    pairs = []
    for i in range(b):
        for j in range(b):
            if i != j:
                d = float(((u[i] - u[j]) ** 2).sum())
                s = _similar(labels, i, j)
                pairs.append(0.5 * s * d + 0.5 * (1 - s) * max(m - d, 0.0))
    reg = sum(float((u[i].abs() - 1).abs().sum()) for i in range(b)) / b
    return sum(pairs) / len(pairs) + alpha * reg


@pytest.mark.parametrize("data", [_single, _multi], ids=["single", "multi"])
def test_dsh_matches_loop(data):
    u, labels = data()
    got = dsh_loss(u, labels, margin=12.0, quant_weight=0.02)
    assert got.item() == pytest.approx(_dsh_loop(u, labels, 12.0, 0.02), rel=1e-5)
    assert DSH(bits=6).margin == 12.0  # m = 2k


def test_dsh_matches_the_reference_implementation():
    """DeepHash-pytorch with its code bank holding exactly this batch: dist to every bank code (self included),
    y = (Y Y^T == 0) dissimilar, loss = mean over b x b of (1 - y)/2 dist + y/2 max(m - dist, 0). Self-pairs
    add 0, so it equals this module's contrastive mean times (b - 1) / b. (The regulariser differs by
    design: the reference's alpha * mean|1 - sgn(u)| is not the paper's.)"""
    for data in (_single, _multi):
        u, labels = data()
        y = _onehot(labels, 4)
        dist = (u.unsqueeze(1) - u.unsqueeze(0)).pow(2).sum(2)
        dis = (y @ y.T == 0).float()
        ref = ((1 - dis) / 2 * dist + dis / 2 * (12.0 - dist).clamp(min=0)).mean()
        b = len(u)
        assert torch.allclose(dsh_loss(u, labels, 12.0, quant_weight=0.0) * (b - 1) / b, ref, rtol=1e-5)


# ---------------------------------------------------------------- DHN

def _dhn_loop(z, labels, scale, lam):
    """Paper over ordered pairs i != j, averaged: log(1 + e^<z_i,z_j>) - s <z_i,z_j>; quantisation
    lambda * sum_k log cosh(|z_ik| - 1), averaged over images."""
    z = z.double()
    b = len(z)
    pairs = []
    for i in range(b):
        for j in range(b):
            if i != j:
                ip = scale * float(z[i] @ z[j])
                pairs.append(math.log1p(math.exp(ip)) - _similar(labels, i, j) * ip)
    quant = sum(math.log(math.cosh(abs(float(x)) - 1)) for x in z.flatten()) / b
    return sum(pairs) / len(pairs) + lam * quant


@pytest.mark.parametrize("data", [_single, _multi], ids=["single", "multi"])
def test_dhn_matches_loop(data):
    u, labels = data()
    z = torch.tanh(u)
    got = dhn_loss(z, labels, ip_scale=1.0, quant_weight=0.3)
    assert got.item() == pytest.approx(_dhn_loop(z, labels, 1.0, 0.3), rel=1e-5)
    # The module applies DHN's tanh to the hash layer's pre-activation.
    assert torch.allclose(DHN(quant_weight=0.3)({"code_logits": u}, labels).loss, got)


def test_dhn_matches_the_reference_implementation():
    """DeepHash-pytorch with its code bank holding exactly this batch: s = (Y Y^T > 0), ip = 0.5 u U^T (no
    tanh), log(1 + e^-|ip|) + max(ip, 0) - s ip averaged over b x b (self-pairs included, s_ii = 1).
    This module's pair mean (ip_scale=0.5) times (b - 1)/b plus the self-pairs' share equals it."""
    for data in (_single, _multi):
        u, labels = data()
        y = _onehot(labels, 4)
        s = (y @ y.T > 0).float()
        ip = u @ u.T * 0.5
        ref = ((1 + (-ip.abs()).exp()).log() + ip.clamp(min=0) - s * ip).mean()
        b = len(u)
        diag = ip.diagonal()
        self_pairs = (F.softplus(diag) - diag).sum() / (b * b)
        ours = dhn_loss(u, labels, ip_scale=0.5, quant_weight=0.0) * (b - 1) / b + self_pairs
        assert torch.allclose(ours, ref, rtol=1e-5)


# ---------------------------------------------------------------- all four

def test_losses_are_lowest_for_codes_that_respect_labels():
    labels = torch.tensor([0, 0, 1, 1])
    good = torch.tensor([[3.0, 3.0, 3.0, 3.0], [3.0, 3.0, 3.0, 3.0], [-3.0, -3.0, 3.0, 3.0], [-3.0, -3.0, 3.0, 3.0]])
    bad = good[[0, 2, 1, 3]]
    for loss in (DSH(bits=4, quant_weight=0.0), DHN(quant_weight=0.0),
                 OrthoHash(bits=4, num_classes=2, codebook_seed=0)):
        if isinstance(loss, OrthoHash):
            good = torch.stack([loss.codebook[int(y)] * 3 for y in labels])
            bad = good[[2, 3, 0, 1]]
        assert loss(good, labels).loss < loss(bad, labels).loss, type(loss).__name__


@pytest.mark.parametrize("cls, kwargs, message", [
    (GreedyHash, {"bits": 8, "num_classes": 0}, "num_classes=0"),
    (OrthoHash, {"bits": 8, "num_classes": 4, "scale": 0}, "scale=0"),
    (OrthoHash, {"bits": 8, "num_classes": 4, "cos_margin": -0.1}, "cos_margin=-0.1"),
    (DSH, {"bits": 8, "margin_per_bit": -1}, "margin_per_bit=-1"),
    (DHN, {"quant_weight": float("nan")}, "quant_weight=nan"),
])
def test_settings_are_validated(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


@pytest.mark.parametrize("method", ["greedyhash", "orthohash", "dsh", "dhn"])
def test_module_trains_the_multilabel_forms(method):
    """Multi-hot labels through HashingModule.training_step: finite, and a few SGD steps lower the loss."""
    from dsrh_lightning.config import load_config, to_dict
    from dsrh_lightning.lightning.module import HashingModule

    cfg = load_config(["dataset=synthetic", f"experiment={method}", "data.sampling=random", "model.bits=8",
                       "model.bag_size=4", "model.dropout=0"])
    torch.manual_seed(0)
    module = HashingModule(to_dict(cfg), num_classes=4, multilabel=True, feature_dim=10)
    labels = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 0], [0, 0, 0, 1]] * 2)
    x = labels.float() @ (torch.randn(4, 10) * 3) + 0.1 * torch.randn(12, 10)
    opt = torch.optim.SGD(module.parameters(), lr=0.05)
    losses = []
    for step in range(25):
        opt.zero_grad()
        loss = module.training_step((x, labels), step)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
