"""Frozen-backbone feature cache: keyed on disk, equal to the backbone's eval-mode output, reused, and
trained on through the same module, losses and evaluation."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dsrh_lightning.config import load_config
from dsrh_lightning.data import features as features_mod
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.evaluate import evaluate_checkpoint
from dsrh_lightning.models import build_backbone
from dsrh_lightning.train import train


@pytest.fixture
def feature_overrides(tiny_overrides, tmp_path):
    return tiny_overrides + ["data.cache_features=true", f"data.feature_dir={tmp_path / 'features'}"]


def test_cache_is_keyed_equal_to_backbone_and_reused(feature_overrides, tmp_path, monkeypatch):
    cfg = load_config(feature_overrides)
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    path = dm.feature_cache
    assert path.is_file() and path.parent == tmp_path / "features"
    assert "synthetic-small_cnn-none-32px" in path.name and path.name.endswith("-seed0.npz")
    # Items are feature vectors; explicit triplets stack three of them.
    x, y, _ = dm.train[0]
    assert x.shape == (dm.feature_dim,) and dm.feature_dim == 256
    # Equal to the (seeded) backbone's eval-mode output on the un-augmented image.
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", "none")[0].eval()
    from dsrh_lightning.data.transforms import build_transform
    tf = build_transform(32, 32, False, False)
    j = int(dm.split.query[3])
    with torch.no_grad():
        ref = backbone(tf(dm.source.images[j])[None])[0]
    torch.testing.assert_close(dm.query[3][0], ref, rtol=1e-4, atol=1e-5)
    # A second setup reads the file and never extracts.
    def boom(*a, **k):
        raise AssertionError("features were extracted again")
    monkeypatch.setattr(features_mod, "extract_features", boom)
    dm2 = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm2.setup("fit")
    torch.testing.assert_close(dm2.query[3][0], dm.query[3][0])
    # Another seed (random-init backbone) or input size is another cache file.
    monkeypatch.undo()
    other = HashingDataModule(load_config(feature_overrides + ["seed=1"]), backbone_factory=build_backbone)
    other.setup("fit")
    assert other.feature_cache != path
    assert not torch.allclose(other.query[3][0], dm.query[3][0])


def test_cache_missing_images_are_extracted(tmp_path):
    images = np.random.default_rng(0).integers(0, 255, (6, 8, 8, 3), dtype=np.uint8)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 4))
    tf = lambda im: torch.as_tensor(im, dtype=torch.float32)
    path = tmp_path / "f.npz"
    f1, i1 = features_mod.load_or_extract_features(path, np.array([0, 2]), lambda: net, images, tf, {},
                                                   progress=False)
    assert f1.shape == (2, 4) and list(i1) == [0, 2]
    f2, i2 = features_mod.load_or_extract_features(path, np.array([4, 2, 0]), lambda: net, images, tf, {},
                                                   progress=False)
    assert list(i2) == [0, 2, 4]
    np.testing.assert_allclose(f2[:2], f1, rtol=1e-6)
    rows = features_mod.FeatureRows(f2, i2, len(images))
    with pytest.raises(IndexError, match="no cached feature"):
        rows[1]


@pytest.mark.slow
def test_train_on_cached_features_end_to_end(feature_overrides):
    cfg = load_config(feature_overrides + ["trainer.max_steps=8", "trainer.val_check_interval=4"])
    results = train(cfg)
    assert 0.0 <= results["test/map"] <= 1.0
    ckpt = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["feature_dim"] == 256
    # No backbone weights in the checkpoint: the backbone is the identity on cached features.
    assert not any(k.startswith("net.backbone.") for k in ckpt["state_dict"])
    again = evaluate_checkpoint(Path(results["best_checkpoint"]))
    assert again["test/map"] == pytest.approx(results["test/map"])
