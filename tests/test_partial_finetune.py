"""Partial fine-tuning on cached lower-block outputs (model.train_blocks=N with data.cache_features=true):
the cache holds the frozen part's eval-mode output, the top blocks train on it, the frozen part keeps
its weights and BatchNorm statistics, and the trained network gives the same codes from images."""

import numpy as np
import pytest
import torch
from torch import nn

from dsrh_lightning.config import ConfigError, load_config
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.data.transforms import build_transform
from dsrh_lightning.lightning.module import HashingModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.models.blocks import LowerBackbone, backbone_stages


@pytest.fixture
def partial_overrides(tiny_overrides, tmp_path):
    # small_cnn has 5 blocks (4 conv + FC): the last 2 train, conv1..conv3 are cached.
    return tiny_overrides + ["data.cache_features=true", f"data.feature_dir={tmp_path / 'features'}",
                             "model.train_blocks=2"]


def _image(dm, j):
    return build_transform(32, 32, False, False)(dm.source.images[int(j)])[None]


def test_cache_holds_the_frozen_lower_blocks_output(partial_overrides):
    cfg = load_config(partial_overrides)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    assert dm.feature_cache.name.endswith("-seed0-below2.npz")
    assert dm.feature_dim is None  # not feature vectors: the network keeps its backbone
    x = dm.query[3][0]
    assert x.shape == (128, 4, 4)  # conv3's output on 32 px images
    torch.manual_seed(0)
    lower = LowerBackbone(build_backbone("small_cnn", "none")[0], stage=4).eval()
    with torch.no_grad():
        ref = lower(_image(dm, dm.split.query[3]))[0]
    torch.testing.assert_close(x, ref, rtol=1e-5, atol=1e-6)
    # The whole-backbone cache is another file.
    whole = HashingDataModule(load_config(partial_overrides[:-1]), backbone_factory=build_backbone)
    whole.setup("fit")
    assert whole.feature_cache != dm.feature_cache and whole.feature_dim == 256


def test_cached_forward_equals_the_full_network(partial_overrides):
    cfg = load_config(partial_overrides)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    module = HashingModule(dict(cfg), num_classes=dm.num_classes, feature_dim=dm.feature_dim).eval()
    net = module.net
    assert net.input_stage == 4
    js = dm.split.query[:5]
    cached = torch.stack([dm.query[i][0] for i in range(5)])
    images = torch.cat([_image(dm, j) for j in js])
    with torch.no_grad():
        a, b = net(cached), net(images)  # images (3 channels) run through the whole backbone
    for k in ("features", "code_logits", "logits"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def test_trainable_part_gets_gradients_frozen_part_keeps_weights_and_statistics(partial_overrides):
    cfg = load_config(partial_overrides)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    module = HashingModule(dict(cfg), num_classes=dm.num_classes, feature_dim=dm.feature_dim)
    net = module.net
    stages = backbone_stages(net.backbone)
    lower = [m for s in stages[:4] for m in s.modules]
    upper = [m for s in stages[4:] for m in s.modules]
    before = {k: v.clone() for k, v in net.backbone.state_dict().items()}
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.5)
    x = torch.stack([dm.train[i][0] for i in range(16)])
    net.train()
    for _ in range(3):
        out = net(x)
        loss = out["codes"].sum() + out["logits"].square().sum()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in upper for p in m.parameters())
        assert all(p.grad is None for m in lower for p in m.parameters())
        opt.step()
    after = net.backbone.state_dict()
    lower_keys = {k for k in before if k.startswith("features.") and int(k.split(".")[1]) < 12}
    assert lower_keys and any("running_mean" in k for k in lower_keys)
    for k in lower_keys:  # conv1..conv3 weights and BatchNorm statistics
        assert torch.equal(before[k], after[k]), k
    changed = [k for k in before if k not in lower_keys and not torch.equal(before[k], after[k])]
    assert "features.12.weight" in changed and "features.13.running_mean" in changed and "fc.1.weight" in changed


def test_training_on_cached_blocks_end_to_end_and_encoding_images(partial_overrides, recwarn):
    from dsrh_lightning.runs.checkpoints import load_run
    from dsrh_lightning.runs.train import train
    from dsrh_lightning.search.encode import encoder

    cfg = load_config(partial_overrides + ["trainer.max_steps=6", "trainer.val_check_interval=3"])
    results = train(cfg)
    # the frozen blocks are in eval mode on purpose: Lightning's warning about it is not shown
    assert not [w for w in recwarn if "in eval mode at the start of training" in str(w.message)]
    assert 0.0 <= results["test/map"] <= 1.0
    run = load_run(results["last_checkpoint"])
    torch.manual_seed(0)
    initial = build_backbone("small_cnn", "none")[0].state_dict()
    trained = run.module.net.backbone.state_dict()
    assert torch.equal(trained["features.4.weight"], initial["features.4.weight"])  # conv2: frozen
    assert torch.equal(trained["features.5.running_var"], initial["features.5.running_var"])
    assert not torch.equal(trained["fc.1.weight"], initial["fc.1.weight"])  # the FC block trained
    # An image file gets the code of its cached lower-block output (same weights, eval mode).
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("test")
    with torch.no_grad():
        from_image = encoder(run)(_image(dm, dm.split.query[0]))
        from_cache = run.module(dm.query[0][0][None])
    torch.testing.assert_close(from_image, from_cache, rtol=1e-4, atol=1e-5)


def test_partial_cache_refusals(tiny_overrides, tmp_path):
    base = tiny_overrides + ["data.cache_features=true", f"data.feature_dir={tmp_path}"]
    with pytest.raises(ConfigError, match="model.train_blocks=5 with data.cache_features=true.*nothing to cache"):
        HashingDataModule(load_config(base + ["model.train_blocks=5"]), backbone_factory=build_backbone).setup("fit")
    with pytest.raises(ConfigError, match="data.feature_norm=standardize.*model.train_blocks=2"):
        load_config(base + ["model.train_blocks=2", "data.feature_norm=standardize"])


def test_finetune_speed_benchmark_runs_tiny(tmp_path):
    """benchmarks/finetune_speed.py at its tiny default: both loops run and a row with their step times."""
    import json

    from benchmarks import finetune_speed

    out = tmp_path / "rows.jsonl"
    finetune_speed.main(["--feature-dir", str(tmp_path / "f"), "--rounds", "1", "--warmup", "1", "--steps", "2",
                         "--batch-size", "16", "--results", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["mode"] == "step" and row["train_blocks"] == 2 and row["cache_features"] is True
    assert row["lightning_step_ms"] > 0 and row["plain_step_ms"] > 0
    assert row["ratio"] == pytest.approx(row["lightning_step_ms"] / row["plain_step_ms"], rel=1e-2)
    # Training on images (the frozen blocks run every step): the plain loop finishes device-path batches too.
    out.unlink()
    finetune_speed.main(["--no-cache", "--rounds", "1", "--warmup", "1", "--steps", "2", "--batch-size", "16",
                         "--results", str(out)])
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["cache_features"] is False and row["plain_step_ms"] > 0
    cfg = load_config(finetune_speed.step_overrides(finetune_speed.parse_args(
        ["--backbone", "efficientnet_lite0", "--image-size", "96", "--train-blocks", "3", "--dataset", "cifar10"])))
    assert cfg.model.train_blocks == 3 and cfg.data.image_size == 96 and cfg.data.cache_features


def test_flip_half_mirrors_about_half_of_the_items_and_keeps_the_rest():
    from dsrh_lightning.data.transforms import flip_half

    x = torch.randn(64, 8, 3, 5)
    out = flip_half(x, torch.Generator().manual_seed(0))
    mirrored = [bool(torch.equal(out[i], x[i].flip(-1))) for i in range(64)]
    kept = [bool(torch.equal(out[i], x[i])) for i in range(64)]
    assert all(m or k for m, k in zip(mirrored, kept))
    assert 16 <= sum(mirrored) <= 48 and sum(kept) >= 16
    again = flip_half(x, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator decides


@pytest.mark.parametrize("flip, training, expect_flips", [(True, True, True), (True, False, False),
                                                          (False, True, False)])
def test_cache_flip_applies_to_training_batches_only(partial_overrides, flip, training, expect_flips):
    from types import SimpleNamespace

    cfg = load_config(partial_overrides + [f"data.cache_flip={str(flip).lower()}"])
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(training=training)
    maps = torch.stack([dm.train[i][0] for i in range(32)])
    labels = torch.arange(32)
    torch.manual_seed(1)
    out, out_labels = dm.on_after_batch_transfer((maps, labels), 0)
    assert torch.equal(out_labels, labels)
    changed = [not torch.equal(out[i], maps[i]) for i in range(32)]
    if expect_flips:
        assert any(changed) and all(torch.equal(out[i], maps[i].flip(-1)) for i in range(32) if changed[i])
    else:
        assert not any(changed)
