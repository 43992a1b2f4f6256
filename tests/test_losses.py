"""Losses against slow, obviously-correct loop implementations."""

import math

import pytest
import torch

from dsrh_lightning.losses import classification_loss, effective_margin, orthogonality_penalty, triplet_ranking_loss


def ref_triplet(q, p, n, margin):
    total = 0.0
    for i in range(q.shape[0]):
        dp = sum((q[i, j] - p[i, j]) ** 2 for j in range(q.shape[1]))
        dn = sum((q[i, j] - n[i, j]) ** 2 for j in range(q.shape[1]))
        total += max(0.0, float(margin - dn + dp))
    return total / q.shape[0]


def ref_orth(mats):
    total = 0.0
    for h in mats:
        m, k = h.shape
        ht = [[2 * h[r, c].item() - 1 for c in range(k)] for r in range(m)]
        for a in range(k):
            for b in range(k):
                g = sum(ht[r][a] * ht[r][b] for r in range(m)) / m
                total += (g - (1.0 if a == b else 0.0)) ** 2
    return total / len(mats)


@pytest.mark.parametrize("margin", [0.5, 1.0, 4.0])
def test_triplet_matches_reference(margin):
    g = torch.Generator().manual_seed(0)
    q, p, n = (torch.rand(7, 12, generator=g, dtype=torch.float64) for _ in range(3))
    got = triplet_ranking_loss(q, p, n, margin).item()
    assert got == pytest.approx(ref_triplet(q, p, n, margin), rel=1e-6)


def test_triplet_zero_when_separated_and_positive_when_violated():
    q = torch.zeros(1, 4)
    assert triplet_ranking_loss(q, torch.zeros(1, 4), torch.ones(1, 4), 1.0).item() == 0.0
    # positive farther than negative: loss = 1 - 0 + 4 = 5
    assert triplet_ranking_loss(q, torch.ones(1, 4), torch.zeros(1, 4), 1.0).item() == pytest.approx(5.0)


def test_triplet_gradient_pulls_positive_and_pushes_negative():
    q = torch.full((1, 3), 0.5, requires_grad=True)
    p = torch.full((1, 3), 0.9, requires_grad=True)
    n = torch.full((1, 3), 0.6, requires_grad=True)
    triplet_ranking_loss(q, p, n, 1.0).backward()
    assert (p.grad > 0).all()   # moving p towards q (down) lowers the loss
    assert (n.grad < 0).all()                                      # moving n away from q (up) lowers loss


def test_triplet_empty_and_shape_errors():
    z = torch.zeros(0, 8)
    assert triplet_ranking_loss(z, z, z).item() == 0.0
    with pytest.raises(ValueError):
        triplet_ranking_loss(torch.zeros(2, 8), torch.zeros(2, 8), torch.zeros(3, 8))


def test_effective_margin():
    assert effective_margin(1.0, 48, "constant") == 1.0
    assert effective_margin(0.25, 48, "per_bit") == 12.0
    with pytest.raises(ValueError):
        effective_margin(1.0, 12, "linear")


@pytest.mark.parametrize("norm, div", [("none", 1), ("bits", 6), ("bits2", 36)])
def test_orthogonality_matches_reference(norm, div):
    g = torch.Generator().manual_seed(1)
    mats = [torch.rand(5, 6, generator=g, dtype=torch.float64) for _ in range(3)]
    got = orthogonality_penalty(mats, norm).item()
    assert got == pytest.approx(ref_orth(mats) / div, rel=1e-5)


def test_orthogonality_zero_for_orthogonal_binary_codes():
    # Rows of a 4x4 Hadamard matrix mapped to {0,1}: columns are orthogonal, so H~^T H~ / m = I.
    had = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]], dtype=torch.float32)
    h = (had + 1) / 2
    assert orthogonality_penalty([h], "none").item() == pytest.approx(0.0, abs=1e-7)
    # all-equal bits are maximally correlated: every entry of the gram matrix is 1 -> k^2 - k off-diagonal ones
    assert orthogonality_penalty([torch.ones(4, 4)], "none").item() == pytest.approx(12.0)


def test_orthogonality_is_float32_under_bf16_autocast():
    h = torch.rand(8, 12).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = orthogonality_penalty([h], "none")
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(ref_orth([h.float()]), rel=1e-4)


def test_classification_softmax_and_sigmoid():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 0.3]])
    ids = torch.tensor([0, 2])
    ref = -(math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1))) +
            math.log(math.exp(0.3) / (math.exp(0.1) + math.exp(0.2) + math.exp(0.3)))) / 2
    assert classification_loss(logits, ids).item() == pytest.approx(ref, rel=1e-6)
    multi = torch.tensor([[1, 0, 1], [0, 1, 0]])
    sig = torch.sigmoid(logits)
    ref_bce = -(multi * sig.log() + (1 - multi) * (1 - sig).log()).mean()
    assert classification_loss(logits, multi).item() == pytest.approx(ref_bce.item(), rel=1e-5)
    with pytest.raises(ValueError):
        classification_loss(logits, torch.ones(2, 4))


# ---- in-batch mining from one distance matrix == gathering every mined triplet's codes ----

def _batch_labels(kind, b, g):
    if kind == "single":
        return torch.randint(0, 4, (b,), generator=g)
    lab = (torch.rand(b, 5, generator=g) < 0.35).long()
    lab[torch.arange(b), torch.randint(0, 5, (b,), generator=g)] = 1  # every image has a label
    return lab


def _grads(fn, codes):
    x = codes.clone().requires_grad_(True)
    loss = fn(x)
    loss.backward()
    return loss.detach(), x.grad


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("max_triplets", [0, 37, 100000])
def test_mined_triplet_loss_equals_gathered_loss_and_gradients(kind, max_triplets):
    from dsrh_lightning.losses.miners import mine_all_triplets
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(3)
    codes = torch.rand(20, 12, generator=g)
    labels = _batch_labels(kind, 20, g)

    def gathered(x):
        a, p, n = mine_all_triplets(labels, max_triplets, torch.Generator().manual_seed(7))
        return triplet_ranking_loss(x[a], x[p], x[n], 1.5)

    def matrix(x):
        return mined_triplet_loss(x, labels, 1.5, max_triplets, torch.Generator().manual_seed(7))[0]

    ref_loss, ref_grad = _grads(gathered, codes)
    loss, grad = _grads(matrix, codes)
    assert ref_loss > 0 and ref_grad.abs().sum() > 0  # the comparison is not between zeros
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    count = mined_triplet_loss(codes, labels, 1.5, max_triplets, torch.Generator().manual_seed(7))[1]
    assert float(count) == len(mine_all_triplets(labels, max_triplets, torch.Generator().manual_seed(7))[0])


def test_mined_triplet_loss_matches_loop_and_is_zero_without_triplets():
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(0)
    codes = torch.rand(6, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 0])
    total, count = 0.0, 0
    for a in range(6):
        for p in range(6):
            for n in range(6):
                if p != a and labels[p] == labels[a] and labels[n] != labels[a]:
                    dp = float(((codes[a] - codes[p]) ** 2).sum())
                    dn = float(((codes[a] - codes[n]) ** 2).sum())
                    total += max(0.0, 2.0 - dn + dp)
                    count += 1
    loss, got_count = mined_triplet_loss(codes, labels, 2.0)
    assert float(got_count) == count and loss.item() == pytest.approx(total / count, rel=1e-6)
    empty, n0 = mined_triplet_loss(codes, torch.zeros(6, dtype=torch.long), 2.0)
    assert float(n0) == 0 and empty.item() == 0.0


def _ref_active_mean(hinges):
    active = [h for h in hinges if h > 0]
    return sum(active) / len(active) if active else 0.0


def test_triplet_average_active_divides_by_the_triplets_with_a_positive_hinge():
    """loss.triplet_average=active: the summed hinge over the number of violated triplets (loop reference);
    ``all`` stays the plain mean. Explicit triplets and in-batch mining alike."""
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(4)
    q, p, n = (torch.rand(9, 6, generator=g, dtype=torch.float64) for _ in range(3))
    hinges = [max(0.0, float(0.3 - ((q[i] - n[i]) ** 2).sum() + ((q[i] - p[i]) ** 2).sum())) for i in range(9)]
    assert 0 < sum(h > 0 for h in hinges) < 9  # some triplets satisfied, some not: the two averages differ
    assert triplet_ranking_loss(q, p, n, 0.3, "active").item() == pytest.approx(_ref_active_mean(hinges), rel=1e-6)
    assert triplet_ranking_loss(q, p, n, 0.3, "all").item() == pytest.approx(sum(hinges) / 9, rel=1e-6)

    codes = torch.rand(8, 5, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 2, 1])
    hinges = [max(0.0, float(0.6 - ((codes[a] - codes[n]) ** 2).sum() + ((codes[a] - codes[p]) ** 2).sum()))
              for a in range(8) for p in range(8) for n in range(8)
              if p != a and labels[p] == labels[a] and labels[n] != labels[a]]
    assert 0 < sum(h > 0 for h in hinges) < len(hinges)
    loss, count = mined_triplet_loss(codes, labels, 0.6, average="active")
    assert loss.item() == pytest.approx(_ref_active_mean(hinges), rel=1e-6) and float(count) == len(hinges)
    # Nothing violated: 0, not a division by zero.
    assert triplet_ranking_loss(q, q, 1 - q.round(), 0.0, "active").item() == 0.0
    with pytest.raises(ValueError, match="triplet_average"):
        triplet_ranking_loss(q, p, n, 1.0, "hardest")


@pytest.mark.parametrize("max_triplets", [0, 37])
def test_mined_active_average_equals_gathered_loss_and_gradients(max_triplets):
    from dsrh_lightning.losses.miners import mine_all_triplets
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(8)
    codes = torch.rand(20, 12, generator=g)
    labels = _batch_labels("single", 20, g)

    def gathered(x):
        a, p, n = mine_all_triplets(labels, max_triplets, torch.Generator().manual_seed(7))
        return triplet_ranking_loss(x[a], x[p], x[n], 1.5, "active")

    def matrix(x):
        return mined_triplet_loss(x, labels, 1.5, max_triplets, torch.Generator().manual_seed(7), "active")[0]

    ref_loss, ref_grad = _grads(gathered, codes)
    loss, grad = _grads(matrix, codes)
    assert ref_loss > 0 and ref_grad.abs().sum() > 0
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kind", ["single", "multi"])
@pytest.mark.parametrize("max_triplets", [0, 50])
def test_mined_weighted_ranking_equals_gathered_loss_and_gradients(kind, max_triplets):
    from dsrh_lightning.losses import weighted_ranking_loss
    from dsrh_lightning.losses.miners import mine_multilevel_triplets
    from dsrh_lightning.losses.semantic_ranking import mined_weighted_ranking_loss

    g = torch.Generator().manual_seed(5)
    codes = torch.rand(18, 16, generator=g)
    labels = _batch_labels(kind, 18, g)
    # A query that shares no label with any other image (Z_q = 0, no triplet): must not poison the loss.
    labels[0] = 9 if kind == "single" else 0

    def gathered(x):
        q, i, j, w = mine_multilevel_triplets(labels, max_triplets, torch.Generator().manual_seed(1))
        return weighted_ranking_loss(x, q, i, j, w, 2.0)

    def matrix(x):
        return mined_weighted_ranking_loss(x, labels, 2.0, max_triplets, torch.Generator().manual_seed(1))[0]

    ref_loss, ref_grad = _grads(gathered, codes)
    loss, grad = _grads(matrix, codes)
    assert ref_loss > 0 and ref_grad.abs().sum() > 0
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def test_mined_weighted_ranking_matches_loop():
    """Zhao et al.'s loss written out: sum over (q, i, j) with r_qi > r_qj of w * hinge, / b."""
    from dsrh_lightning.losses.semantic_ranking import mined_weighted_ranking_loss

    g = torch.Generator().manual_seed(2)
    codes = torch.rand(6, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 1, 1], [1, 1, 1], [0, 0, 1], [1, 0, 1]])
    b, k = codes.shape
    r = [[int((labels[x] * labels[y]).sum()) for y in range(b)] for x in range(b)]

    def ham(x, y):
        return float(sum((k - sum((2 * codes[x, t] - 1) * (2 * codes[y, t] - 1) for t in range(k))) / 2
                         for _ in [0]))

    total = 0.0
    for q in range(b):
        gains = sorted((2.0 ** r[q][y] - 1 for y in range(b) if y != q), reverse=True)
        z = sum(gn / math.log2(pos + 2) for pos, gn in enumerate(gains))
        for i in range(b):
            for j in range(b):
                if q not in (i, j) and r[q][i] > r[q][j]:
                    w = (2.0 ** r[q][i] - 2.0 ** r[q][j]) / z
                    total += w * max(0.0, 1.0 + ham(q, i) - ham(q, j))
    loss, _ = mined_weighted_ranking_loss(codes, labels, 1.0)
    assert loss.item() == pytest.approx(total / b, rel=1e-6)


def test_nan_guard_syncs_only_at_log_checkpoint_and_last_steps(monkeypatch):
    """The non-finite check is a device-side flag; the host reads it only on steps that log, write a
    periodic checkpoint or end the run, and it names the first bad step, not the step that noticed."""
    from dsrh_lightning.config import load_config, to_dict
    from dsrh_lightning.lightning.module import HashingModule

    cfg = load_config(["dataset=synthetic", "model.bits=8", "model.bag_size=4", "data.batch_size=4",
                       "trainer.log_every_n_steps=5", "trainer.checkpoint_every_n_steps=7", "trainer.max_steps=12"])
    module = HashingModule(to_dict(cfg), num_classes=3, feature_dim=6)
    step = {"now": 0}
    monkeypatch.setattr(HashingModule, "global_step", property(lambda self: step["now"]))
    checked = []
    orig_check = HashingModule.check_finite

    def check(self):
        checked.append(step["now"])
        orig_check(self)

    monkeypatch.setattr(HashingModule, "check_finite", check)
    x = torch.randn(4, 3, 6)
    lab = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 2, 0], [0, 0, 2]])
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2: ranking=.*loss=nan"):
        for s in range(12):
            step["now"] = s
            if s == 2:  # poison one step's input: its loss is NaN
                module.training_step((torch.full_like(x, float("nan")), lab), s)
            else:
                module.training_step((x, lab), s)
    assert checked == [4]  # steps 0-3 never synchronised; step 4 (5 done = a log step) raised
    checked.clear()
    fresh = HashingModule(to_dict(cfg), num_classes=3, feature_dim=6)
    for s in range(12):
        step["now"] = s
        fresh.training_step((x, lab), s)
    assert checked == [4, 6, 9, 11]  # log steps (5, 10 done), checkpoint (7 done), last (12 done)


def _loop_mined_hinges(codes, labels, margin, mining):
    """Slow reference for loss.triplet_mining: the hinges of the triplets a loop over (a, p, n) selects."""
    b = len(labels)
    d = [[float(((codes[i] - codes[j]) ** 2).sum()) for j in range(b)] for i in range(b)]
    same = [[bool(labels[i] == labels[j]) for j in range(b)] for i in range(b)]
    if mining == "hard":
        hinges = []
        for a in range(b):
            pos = [d[a][p] for p in range(b) if p != a and same[a][p]]
            neg = [d[a][n] for n in range(b) if not same[a][n]]
            if pos and neg:
                hinges.append(max(0.0, margin - min(neg) + max(pos)))
        return hinges
    return [max(0.0, margin - d[a][n] + d[a][p]) for a in range(b) for p in range(b) for n in range(b)
            if p != a and same[a][p] and not same[a][n]
            and (mining == "all" or d[a][p] < d[a][n] < d[a][p] + margin)]


@pytest.mark.parametrize("mining", ["semihard", "hard"])
@pytest.mark.parametrize("average", ["all", "active"])
def test_triplet_mining_matches_loop_reference(mining, average):
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(11)
    labels = torch.tensor([0, 0, 1, 1, 2, 0, 2, 1, 3, 3])
    # Codes near a centre per class: some anchors' hardest triplets are satisfied, some not.
    codes = torch.rand(4, 6, generator=g, dtype=torch.float64)[labels] + 0.8 * torch.rand(10, 6, generator=g,
                                                                                          dtype=torch.float64)
    hinges = _loop_mined_hinges(codes, labels, 0.8, mining)
    everything = _loop_mined_hinges(codes, labels, 0.8, "all")
    assert 0 < len(hinges) < len(everything)
    if mining == "hard":  # some anchors' hardest triplets satisfied, some not: the two averages differ
        assert 0 < sum(h > 0 for h in hinges) < len(hinges)
    else:  # semi-hard triplets lie within the margin; valid triplets beyond it exist and are left out
        assert all(h > 0 for h in hinges) and any(h == 0 for h in everything)
    want = _ref_active_mean(hinges) if average == "active" else sum(hinges) / len(hinges)
    loss, count = mined_triplet_loss(codes, labels, 0.8, average=average, mining=mining)
    assert loss.item() == pytest.approx(want, rel=1e-6) and float(count) == len(hinges)
    # An anchor without a positive (class 4 alone) is left out of the hard mining's average.
    lone = torch.cat([labels[:-1], torch.tensor([4])])
    assert float(mined_triplet_loss(codes, lone, 0.8, mining=mining)[1]) == len(_loop_mined_hinges(codes, lone, 0.8,
                                                                                                     mining))
    empty, n0 = mined_triplet_loss(codes, torch.zeros(10, dtype=torch.long), 0.8, mining=mining)
    assert float(n0) == 0 and empty.item() == 0.0
    with pytest.raises(ValueError, match="max_triplets"):
        mined_triplet_loss(codes, labels, 0.8, max_triplets=5, mining=mining)
    with pytest.raises(ValueError, match="triplet_mining"):
        mined_triplet_loss(codes, labels, 0.8, mining="hardest")


@pytest.mark.parametrize("average", ["all", "active"])
def test_hard_and_semihard_mining_equal_gathered_loss_and_gradients(average):
    """The matrix forms against the explicit-triplet loss on the triplets a loop picks (same loss, same gradient)."""
    from dsrh_lightning.losses.triplet import mined_triplet_loss

    g = torch.Generator().manual_seed(12)
    codes = torch.rand(20, 12, generator=g)
    labels = _batch_labels("single", 20, g)
    d = torch.cdist(codes.double(), codes.double()) ** 2
    same = labels[:, None] == labels[None, :]
    hard, semi = [], []
    for a in range(20):
        pos = [p for p in range(20) if p != a and same[a, p]]
        neg = [n for n in range(20) if not same[a, n]]
        if pos and neg:
            hard.append((a, max(pos, key=lambda p: d[a, p]), min(neg, key=lambda n: d[a, n])))
        semi += [(a, p, n) for p in pos for n in neg if d[a, p] < d[a, n] < d[a, p] + 1.5]
    for mining, triplets in (("hard", hard), ("semihard", semi)):
        a, p, n = (torch.tensor(t) for t in zip(*triplets))
        ref_loss, ref_grad = _grads(lambda x: triplet_ranking_loss(x[a], x[p], x[n], 1.5, average), codes)
        loss, grad = _grads(lambda x: mined_triplet_loss(x, labels, 1.5, average=average, mining=mining)[0], codes)
        assert ref_loss > 0 and ref_grad.abs().sum() > 0
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
