"""Frozen backbone parts stay frozen: no weight, BatchNorm statistic or dropout mask changes, through
plain training steps and through Lightning's train()/eval() switching around validation."""

import pytest
import torch
from torch import nn

from dsrh_lightning.config import ConfigError, load_config
from dsrh_lightning.models import build_backbone, build_network
from dsrh_lightning.models.blocks import backbone_stages, num_blocks


def _state(module: nn.Module):
    """Every parameter and buffer (BatchNorm running statistics included), cloned."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sgd_steps(net, steps=3, lr=0.5):
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        net.train()
        out = net(torch.randn(8, 3, 32, 32, generator=gen) * 3 + 1)  # far from BatchNorm's initial statistics
        loss = out["codes"].sum() + out["logits"].square().sum()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_freeze_backbone_keeps_weights_and_batchnorm_statistics():
    cfg = load_config(["dataset=synthetic", "model.bits=12", "model.freeze_backbone=true"])
    net = build_network(cfg.model, num_classes=10)
    assert any(isinstance(m, nn.BatchNorm2d) for m in net.backbone.modules())
    before, head_before = _state(net.backbone), _state(net.hash_head)
    _sgd_steps(net)
    after = _state(net.backbone)
    assert before.keys() == after.keys()
    for k in before:  # weights AND running_mean / running_var / num_batches_tracked
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(head_before["fc.weight"], net.hash_head.fc.weight)  # the heads did train
    assert not net.backbone.training and net.training


def test_without_freezing_batchnorm_statistics_do_change():
    """The control: the same steps on an unfrozen backbone move its BatchNorm statistics (so the test
    above could fail)."""
    cfg = load_config(["dataset=synthetic", "model.bits=12"])
    net = build_network(cfg.model, num_classes=10)
    before = _state(net.backbone)
    _sgd_steps(net)
    bn = [k for k in before if k.endswith("running_mean")]
    assert bn and all(not torch.equal(before[k], net.backbone.state_dict()[k]) for k in bn)


def test_frozen_dropout_is_inactive_in_train_mode():
    # VGG's classifier (fc6, fc7) has dropout; frozen, two forwards in train mode agree exactly.
    cfg = load_config(["dataset=synthetic", "model.backbone=vgg16", "model.weights=none", "model.bits=12",
                       "model.freeze_backbone=true"])
    net = build_network(cfg.model, num_classes=10)
    drops = [m for m in net.backbone.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(not m.training for m in drops)
    net.train()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net.backbone_features(x), net.backbone_features(x))
    # Control: unfrozen, the same backbone's dropout draws different masks.
    cfg.model.freeze_backbone = False
    free = build_network(cfg.model, num_classes=10).train()
    with torch.no_grad():
        assert not torch.equal(free.backbone_features(x), free.backbone_features(x))


def test_train_blocks_freezes_the_lower_part_only():
    cfg = load_config(["dataset=synthetic", "model.bits=12", "model.train_blocks=2"])  # small_cnn: 5 blocks
    net = build_network(cfg.model, num_classes=10)
    stages = backbone_stages(net.backbone)
    assert num_blocks(net.backbone) == 5
    lower = [m for s in stages[:4] for m in s.modules]   # empty stem + conv1..conv3
    upper = [m for s in stages[4:] for m in s.modules]   # conv4 + fc
    lower_state = {id(m): _state(m) for m in lower}
    upper_w = [p.detach().clone() for m in upper for p in m.parameters()]
    _sgd_steps(net)
    for m in lower:
        assert not m.training
        for k, v in m.state_dict().items():
            assert torch.equal(lower_state[id(m)][k], v), (m, k)
        assert all(not p.requires_grad for p in m.parameters())
    assert all(m.training for m in upper)
    now = [p for m in upper for p in m.parameters()]
    assert all(p.requires_grad for p in now) and any(not torch.equal(a, b) for a, b in zip(upper_w, now))
    # The trainable block's BatchNorm learns statistics.
    bn4 = stages[4].modules[1]
    assert isinstance(bn4, nn.BatchNorm2d) and int(bn4.num_batches_tracked) == 3


@pytest.mark.parametrize("n, frozen_params", [(-1, 0), (0, None)])
def test_train_blocks_all_and_none(n, frozen_params):
    cfg = load_config(["dataset=synthetic", f"model.train_blocks={n}"])
    net = build_network(cfg.model, num_classes=10)
    total = sum(1 for _ in net.backbone.parameters())
    frozen = sum(1 for p in net.backbone.parameters() if not p.requires_grad)
    assert frozen == (total if frozen_params is None else frozen_params)


def test_train_blocks_out_of_range_names_the_key_and_the_count():
    cfg = load_config(["dataset=synthetic", "model.train_blocks=6"])
    with pytest.raises(ConfigError, match=r"model.train_blocks=6: SmallCNN has 5 blocks"):
        build_network(cfg.model, num_classes=10)
    with pytest.raises(ConfigError, match="model.train_blocks=-2"):
        load_config(["dataset=synthetic", "model.train_blocks=-2"])
    with pytest.raises(ConfigError, match="freeze_backbone=true is train_blocks=0"):
        load_config(["dataset=synthetic", "model.freeze_backbone=true", "model.train_blocks=2"])


@pytest.mark.parametrize("name, hash_input, blocks", [
    ("small_cnn", "last", 5), ("resnet18", "last", 4), ("vgg16", "last", 6), ("vgg16", "last_two", 6),
    ("efficientnet_lite0", "last", 8)])
def test_stages_compose_to_the_backbone_and_never_carry_three_channels(name, hash_input, blocks):
    if name == "efficientnet_lite0":
        pytest.importorskip("timm")
    torch.manual_seed(0)
    net, _ = build_backbone(name, "none", hash_input)
    net.eval()
    stages = backbone_stages(net)
    assert len(stages) == blocks + 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        h = x
        for i, s in enumerate(stages):
            h = s.fn(h)
            if i < len(stages) - 1 and s.modules:
                # HashingNetwork tells cached stage outputs from images by their channel count.
                assert h.shape[1] != 3, (name, s.name)
        assert torch.equal(h, net(x))
    # Every parameter belongs to exactly one stage.
    owned = [id(p) for s in stages for m in s.modules for p in m.parameters()]
    assert sorted(owned) == sorted(id(p) for p in net.parameters())


def test_frozen_parts_stay_in_eval_mode_through_lightning_validation(tiny_overrides, monkeypatch):
    """A real fit with validations in between: the frozen backbone is in eval mode at every training
    step, and its weights and BatchNorm statistics end as they started."""
    import pytorch_lightning as pl

    import dsrh_lightning.runs.train as train_mod

    seen = {"modes": []}

    class Spy(pl.Callback):
        def on_fit_start(self, trainer, module):
            seen["module"], seen["before"] = module, _state(module.net.backbone)

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen["modes"].append((module.net.training, [m.training for m in module.net.backbone.modules()]))

    build = train_mod.build_trainer
    monkeypatch.setattr(train_mod, "build_trainer",
                        lambda cfg, run_dir, logger, callbacks: build(cfg, run_dir, logger, list(callbacks) + [Spy()]))
    train_mod.train(load_config(tiny_overrides + ["model.freeze_backbone=true", "trainer.test_after_fit=false"]))
    assert len(seen["modes"]) == 12  # validations ran at steps 6 and 12 in between
    assert all(net and not any(sub) for net, sub in seen["modes"])
    after = _state(seen["module"].net.backbone)
    for k, v in seen["before"].items():
        assert torch.equal(v, after[k]), k
