"""Losses as objects built from keyword arguments, miners that choose their triplets, the one adapter from the
run config, and the upgrade of saved configs (loss.triplet_weight -> loss.ranking_weight)."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dsrh_lightning.config import ConfigError, load_config, to_dict, upgrade_legacy_config
from dsrh_lightning.losses.from_config import build_miner, build_ranking_loss, loss_kwargs
from dsrh_lightning.losses.miners import (AllTriplets, ExplicitTriplets, HardestTriplets, MultilevelTriplets,
                                         SemiHardTriplets, Triplets)
from dsrh_lightning.losses.peers import CSQ, DPSH, DTSH, HashNet, dpsh_loss, dtsh_loss
from dsrh_lightning.losses.triplet import TripletRanking, triplet_ranking_loss

REPO = Path(__file__).resolve().parents[1]


def test_a_loss_trains_in_a_plain_pytorch_loop_without_lightning_or_a_config():
    code = """
import sys, torch
from dsrh_lightning.losses.triplet import TripletRanking
from dsrh_lightning.losses.miners import AllTriplets
torch.manual_seed(0)
x = torch.randn(4, 6).repeat_interleave(4, 0) + 0.3 * torch.randn(16, 6)
labels = torch.arange(4).repeat_interleave(4)
net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Sigmoid())
loss_fn, miner = TripletRanking(bits=8, margin=1.0), AllTriplets()
opt = torch.optim.SGD(net.parameters(), lr=0.5)
losses = []
for _ in range(30):
    codes = net(x)
    loss = loss_fn(codes, labels, miner(codes, labels)).loss
    opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
assert losses[-1] < 0.5 * losses[0], losses
print(sorted(m for m in ("pytorch_lightning", "lightning", "omegaconf") if m in sys.modules))
"""
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_settings_are_validated_where_they_are_declared():
    with pytest.raises(ValueError, match="margin_scaling='per_bits'"):
        TripletRanking(bits=8, margin_scaling="per_bits")
    with pytest.raises(ValueError, match="average='mean'"):
        TripletRanking(bits=8, average="mean")
    with pytest.raises(ValueError, match="margin=-1"):
        TripletRanking(bits=8, margin=-1)
    with pytest.raises(ValueError, match="bits=0"):
        CSQ(bits=0, num_classes=4)
    with pytest.raises(ValueError, match="quant_weight=-0.1"):
        DTSH(quant_weight=-0.1)
    assert TripletRanking(bits=8, margin=0.5, margin_scaling="per_bit").margin == 4.0


def _labels():
    return torch.tensor([0, 0, 1, 1, 2, 2, 0, 1])


def _loop_valid(labels):
    b = len(labels)
    return [(a, p, n) for a, p, n in itertools.product(range(b), repeat=3)
            if a != p and labels[a] == labels[p] and labels[a] != labels[n]]


def _loop_mined(codes, labels, mining, margin):
    """The triples each miner should pick, by loops over the batch."""
    d = lambda i, j: float(((codes[i] - codes[j]) ** 2).sum())  # noqa: E731
    valid = _loop_valid(labels)
    if mining == "all":
        return valid
    if mining == "semihard":
        return [(a, p, n) for a, p, n in valid if d(a, p) < d(a, n) < d(a, p) + margin]
    out = []
    for a in range(len(labels)):
        pos = [p for p in range(len(labels)) if p != a and labels[p] == labels[a]]
        neg = [n for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            out.append((a, max(pos, key=lambda p: d(a, p)), min(neg, key=lambda n: d(a, n))))
    return out


@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
def test_miners_pick_the_triples_a_loop_picks(mining):
    torch.manual_seed(1)
    codes, labels = torch.rand(8, 5), _labels()
    miner = {"all": AllTriplets(), "semihard": SemiHardTriplets(margin=0.6), "hard": HardestTriplets()}[mining]
    t = miner(codes, labels)
    got = sorted(zip(*(x.tolist() for x in t.indices())))
    assert got == sorted(_loop_mined(codes, labels, mining, 0.6))
    assert float(t.count()) == len(got)


@pytest.mark.parametrize("relax", ["linear", "sigmoid"])
@pytest.mark.parametrize("mining", ["all", "semihard", "hard"])
def test_dtsh_consumes_any_mining(mining, relax):
    """DTSH on the triples of any miner equals its likelihood summed by a loop over those triples; ``u`` is the
    pre-activation it is given (linear) or ``2h - 1`` of the sigmoid codes it is given."""
    torch.manual_seed(2)
    x, labels = torch.rand(8, 5, dtype=torch.float64).float(), _labels()
    miner = {"all": AllTriplets(), "semihard": SemiHardTriplets(margin=0.6), "hard": HardestTriplets()}[mining]
    dtsh = DTSH(alpha=1.0, quant_weight=0.0, relax=relax)
    assert dtsh.consumes == {"linear": "code_logits", "sigmoid": "codes"}[relax]
    loss = dtsh(x, labels, miner(x, labels)).loss
    u = x.double() if relax == "linear" else 2 * x.double() - 1
    terms = [F.softplus(-(0.5 * u[a] @ u[p] - 0.5 * u[a] @ u[n] - 1.0))
             for a, p, n in _loop_mined(x, labels, mining, 0.6)]
    assert terms and loss.item() == pytest.approx(float(sum(terms) / len(terms)), rel=1e-5)


@pytest.mark.parametrize("cls", [DPSH, DTSH])
def test_dpsh_and_dtsh_read_the_pre_activation_and_keep_a_gradient_where_sigmoids_saturate(cls):
    """From the network's output dict, the linear form's loss is the pure function of ``code_logits`` (the
    papers' ``u``); the sigmoid form's of ``2h - 1``. Where every code agrees and the sigmoids are saturated
    (|z| = 8: the state DTSH collapsed to end to end), the sigmoid form passes almost no gradient back to
    ``z`` and the linear form a full one."""
    torch.manual_seed(4)
    labels = _labels()
    z = (8.0 * torch.ones(len(labels), 6) + 0.01 * torch.randn(len(labels), 6)).requires_grad_()
    grads = {}
    for relax in ("linear", "sigmoid"):
        z.grad = None
        out = {"codes": torch.sigmoid(z), "code_logits": z}
        res = cls(relax=relax)(out, labels)
        u = z if relax == "linear" else 2 * torch.sigmoid(z) - 1
        if cls is DPSH:
            want = dpsh_loss(u, labels, 0.1)
        else:
            want = dtsh_loss(u, *AllTriplets()(u, labels).indices(), 5.0, 0.1)
        assert torch.allclose(res.loss, want)
        assert torch.equal(res.codes, out["codes"])  # the orthogonality term and balance read the codes
        res.loss.backward()
        grads[relax] = z.grad.abs().max().item()
    assert grads["sigmoid"] < 1e-2 and grads["linear"] > 1e-2, grads
    with pytest.raises(ValueError, match="relax='tanh': expected one of 'linear', 'sigmoid'"):
        cls(relax="tanh")


def test_explicit_triplets_are_a_miner():
    """Rows (query, positive, negative) of each triplet: the triplet loss equals the hinge on the three role
    matrices, and DSRH's orthogonality penalty runs over those three matrices."""
    torch.manual_seed(3)
    codes = torch.rand(12, 6)
    labels = torch.tensor([[0, 0, 1], [1, 1, 2], [2, 2, 0], [0, 0, 2]]).flatten()
    t = ExplicitTriplets()(codes, labels)
    assert t.by_role and t.anchor.tolist() == [0, 3, 6, 9] and t.negative.tolist() == [2, 5, 8, 11]
    r = TripletRanking(bits=6, margin=1.0)(codes, labels, t)
    q, p, n = codes.view(4, 3, 6).unbind(1)
    assert torch.equal(r.loss, triplet_ranking_loss(q, p, n, 1.0))
    assert all(torch.equal(a, b) for a, b in zip(r.orth, (q, p, n)))
    # Any triplet loss takes them: DTSH on explicit rows equals DTSH on the same index triples.
    same = Triplets(torch.tensor([0, 3, 6, 9]), torch.tensor([1, 4, 7, 10]), torch.tensor([2, 5, 8, 11]))
    assert torch.equal(DTSH()(codes, labels, t).loss, DTSH()(codes, labels, same).loss)
    with pytest.raises(ValueError, match="3 rows per triplet"):
        ExplicitTriplets()(codes[:10], labels[:10])


def test_explicit_miner_keeps_the_role_view_numerics_bit_for_bit():
    """Hinge + orthogonality through the miner equal, to the last bit in value and gradient, the form that
    read the roles as a (b, 3, k) view: same seed, same weights."""
    from dsrh_lightning.losses.orthogonality import orthogonality_penalty

    torch.manual_seed(4)
    z = torch.randn(48, 12)
    labels = torch.arange(16).repeat_interleave(3) % 5

    def run(via_miner):
        x = z.clone().requires_grad_(True)
        codes = torch.sigmoid(x)
        if via_miner:
            r = TripletRanking(bits=12, margin=1.0)(codes, labels, ExplicitTriplets()(codes, labels))
            total, orth = r.loss, r.orth
        else:
            q, p, n = codes.view(-1, 3, 12).unbind(1)
            total, orth = triplet_ranking_loss(q, p, n, 1.0), [q, p, n]
        total = total + 0.25 * orthogonality_penalty(orth)
        total.backward()
        return total.detach(), x.grad

    (a, ga), (b, gb) = run(True), run(False)
    assert torch.equal(a, b) and torch.equal(ga, gb)


def test_triplets_must_have_one_form():
    with pytest.raises(ValueError, match="either"):
        Triplets()
    with pytest.raises(ValueError, match="shapes differ"):
        Triplets(torch.arange(3), torch.arange(3), torch.arange(2))


def _cfg(*over):
    return load_config(["dataset=synthetic", "model.bits=8", *over])


def test_the_adapter_maps_config_keys_to_keyword_arguments():
    assert loss_kwargs(_cfg("loss.margin=0.3", "loss.margin_scaling=per_bit", "loss.triplet_average=active"), 4) == {
        "bits": 8, "margin": 0.3, "margin_scaling": "per_bit", "average": "active"}
    assert loss_kwargs(_cfg("experiment=dtsh", "loss.dtsh_margin=2.5", "loss.quant_weight=0.2"), 4) == {
        "alpha": 2.5, "quant_weight": 0.2}
    assert loss_kwargs(_cfg("experiment=hashnet", "loss.hashnet_alpha=0"), 4)["alpha"] is None  # 0 = 10 / bits
    h = build_ranking_loss(_cfg("experiment=hashnet", "loss.hashnet_alpha=0.5", "loss.hashnet_gamma=0.01"), 4)
    assert isinstance(h, HashNet) and (h.alpha, h.gamma) == (0.5, 0.01)
    c = build_ranking_loss(_cfg("experiment=csq"), 4)
    assert isinstance(c, CSQ) and c.centers.shape == (4, 8)


def test_the_adapter_refuses_params_it_cannot_place():
    with pytest.raises(ConfigError, match=r"loss.params.alpha: loss.ranking=dtsh takes 'alpha' from loss.dtsh_margin"):
        build_ranking_loss(_cfg("experiment=dtsh", "loss.params.alpha=1.0"), 4)
    with pytest.raises(ConfigError, match=r"loss.params.margin: .* from loss.margin"):
        build_ranking_loss(_cfg("loss.params.margin=1.0"), 4)
    with pytest.raises(ConfigError, match=r"loss.params.gamma: loss.ranking=dpsh \(DPSH\) has no setting 'gamma'; "
                                          r"it accepts loss.params keys: relax"):
        build_ranking_loss(_cfg("experiment=dpsh", "loss.params.gamma=1.0"), 4)
    assert build_ranking_loss(_cfg("experiment=dtsh", "loss.params.relax=sigmoid"), 4).consumes == "codes"
    assert build_ranking_loss(_cfg("experiment=dpsh"), 4).relax == "linear"
    with pytest.raises(ConfigError, match=r"loss.ranking=triplet \(TripletRanking\): bits=0"):
        cfg = _cfg()
        cfg.model.bits = 0  # set after validation (a checkpoint's config, say)
        build_ranking_loss(cfg, 4)


def test_the_miner_follows_the_sampling_and_mining():
    trip = build_ranking_loss(_cfg(), 4)
    assert isinstance(build_miner(_cfg(), trip), ExplicitTriplets)
    bal = ["data.sampling=balanced", "data.batch_size=16", "data.images_per_class=4"]
    assert isinstance(build_miner(_cfg(*bal, "data.max_triplets=9"), trip), AllTriplets)
    hard = build_miner(_cfg(*bal, "loss.triplet_mining=hard"), trip)
    assert isinstance(hard, HardestTriplets)
    semi = build_miner(_cfg(*bal, "loss.triplet_mining=semihard", "loss.margin=0.25",
                            "loss.margin_scaling=per_bit"), trip)
    assert isinstance(semi, SemiHardTriplets) and semi.margin == 2.0  # the loss's effective margin
    dtsh = build_ranking_loss(_cfg("experiment=dtsh"), 4)
    assert isinstance(build_miner(_cfg("experiment=dtsh", *bal, "loss.triplet_mining=hard"), dtsh), HardestTriplets)
    zhao = _cfg("experiment=dsrh_zhao", "model.hash_input=last")
    assert isinstance(build_miner(zhao, build_ranking_loss(zhao, 4)), MultilevelTriplets)
    assert build_miner(_cfg("experiment=csq"), build_ranking_loss(_cfg("experiment=csq"), 4)) is None
    cfg = _cfg("experiment=dtsh")
    cfg.loss.triplet_mining = "hard"  # after validation: the adapter's own check
    with pytest.raises(ConfigError, match="loss.triplet_mining=hard mines triplets inside each batch"):
        build_miner(cfg, dtsh)


def test_ranking_weight_scales_every_ranking_method_and_the_old_key_is_upgraded():
    from dsrh_lightning.lightning.module import HashingModule

    assert _cfg("experiment=csq", "loss.ranking_weight=0.5").loss.ranking_weight == 0.5
    with pytest.raises(ConfigError, match=r"loss.triplet_weight.*renamed loss.ranking_weight"):
        _cfg("loss.triplet_weight=2")
    old = to_dict(_cfg("experiment=hashnet"))
    del old["loss"]["ranking_weight"]
    old["loss"]["triplet_weight"] = 0.7
    new = upgrade_legacy_config(old)
    assert new["loss"]["ranking_weight"] == 0.7 and "triplet_weight" not in new["loss"]
    assert old["loss"]["triplet_weight"] == 0.7  # the input is not changed
    assert upgrade_legacy_config(new) == new
    # A module built from an old config (a checkpoint's hyperparameters) reads the old key under the new name.
    module = HashingModule(old, num_classes=4, feature_dim=10)
    assert module.cfg.loss.ranking_weight == 0.7


def test_an_old_checkpoint_with_triplet_weight_loads_and_resumes(tiny_overrides, tmp_path):
    from dsrh_lightning.runs.checkpoints import check_resume_compatible, load_run, read_checkpoint
    from dsrh_lightning.runs.train import train

    over = tiny_overrides + ["model.backbone=small_cnn", "model.weights=none", "logger.name=none",
                             "data.num_workers=0", "trainer.max_steps=2", "trainer.val_check_interval=2",
                             "trainer.test_after_fit=false", "loss.ranking_weight=0.75"]
    res = train(load_config(over))
    ckpt = torch.load(res["last_checkpoint"], map_location="cpu", weights_only=False)
    loss = ckpt["hyper_parameters"]["config"]["loss"]
    loss["triplet_weight"] = loss.pop("ranking_weight")  # as an older version wrote it
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    run = load_run(old)
    assert run.cfg.loss.ranking_weight == 0.75
    assert run.module.cfg.loss.ranking_weight == 0.75
    check_resume_compatible(load_config(over + ["resume=auto"]), old, read_checkpoint(old))


def test_train_refuses_bad_loss_settings_before_reading_data(tiny_overrides, tmp_path, monkeypatch):
    from dsrh_lightning.data import datamodule
    from dsrh_lightning.runs.train import train

    def no_data(*args, **kwargs):
        raise AssertionError("data was read before the loss settings were checked")

    monkeypatch.setattr(datamodule.HashingDataModule, "setup", no_data)
    with pytest.raises(ConfigError, match=r"loss.params.bogus: loss.ranking=dtsh \(DTSH\) has no setting 'bogus'"):
        train(load_config(tiny_overrides + ["experiment=dtsh", "loss.params.bogus=1"]))
    cfg = load_config(tiny_overrides + ["experiment=dtsh"])
    cfg.loss.triplet_mining = "hard"  # explicit triplets cannot be mined (set after validation)
    with pytest.raises(ConfigError, match="loss.triplet_mining=hard mines triplets inside each batch"):
        train(cfg)
    assert not (Path(cfg.output_dir) / "smoke").exists()  # no run folder was claimed


def test_a_config_saved_before_newer_loss_keys_still_builds():
    """A checkpoint's config lacks keys added since (loss.params, triplet_mining, triplet_average): a method
    that does not name them builds, and in-batch mining falls back to every triplet."""
    from dsrh_lightning.lightning.module import HashingModule

    old = to_dict(_cfg("experiment=dtsh", "data.sampling=balanced", "data.batch_size=16",
                       "data.images_per_class=4"))
    for key in ("params", "triplet_mining", "triplet_average", "margin_scaling"):
        del old["loss"][key]
    module = HashingModule(old, num_classes=4, feature_dim=10)
    assert isinstance(module.ranking, DTSH) and isinstance(module.miner, AllTriplets)
