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
from dsrh_lightning.runs.evaluate import evaluate_checkpoint
from dsrh_lightning.models import build_backbone
from dsrh_lightning.runs.train import train


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


def test_feature_statistics_match_sklearn_and_a_loop():
    """Per-column mean and population std of the fit rows only, as scikit-learn's StandardScaler has them."""
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(3)
    feats = rng.gamma(2.0, 3.0, (40, 5)).astype(np.float32)
    feats[:, 4] = 7.0  # a constant column: std 1 (centred, not divided by zero), as StandardScaler does
    fit = np.array([1, 4, 5, 9, 10, 20, 33])
    mean, std = features_mod.feature_statistics(feats, fit)
    ref = StandardScaler().fit(feats[fit].astype(np.float64))
    np.testing.assert_allclose(mean, ref.mean_, rtol=1e-6)
    np.testing.assert_allclose(std, ref.scale_, rtol=1e-6)
    for j in range(5):  # the obvious loop
        col = [float(feats[i, j]) for i in fit]
        mu = sum(col) / len(col)
        sd = (sum((c - mu) ** 2 for c in col) / len(col)) ** 0.5
        assert mean[j] == pytest.approx(mu, rel=1e-6) and std[j] == pytest.approx(sd if sd > 1e-6 else 1.0, rel=1e-6)
    assert mean.dtype == std.dtype == np.float32
    with pytest.raises(ValueError, match="no rows"):
        features_mod.feature_statistics(feats, np.array([], dtype=np.int64))


def test_feature_norm_standardize_training_statistics_in_the_model(feature_overrides, tmp_path):
    """The training split's statistics (only) become the model's first layer: saved in the checkpoint and
    applied to image files indexed later through the backbone."""
    from dsrh_lightning.runs.checkpoints import load_run
    from dsrh_lightning.search.encode import encoder

    cfg = load_config(feature_overrides + ["data.feature_norm=standardize", "trainer.max_steps=4",
                                           "trainer.val_check_interval=2"])
    dm = HashingDataModule(cfg, backbone_factory=build_backbone)
    dm.setup("fit")
    train_x = torch.stack([dm.train[i][0] for i in range(len(dm.split.train))]).double()
    mean, std = dm.feature_stats
    torch.testing.assert_close(torch.from_numpy(mean).double(), train_x.mean(0), rtol=1e-5, atol=1e-6)
    sd = train_x.std(0, unbiased=False)
    dead = sd < 1e-6  # constant features (dead ReLUs of the random backbone): centred, std 1
    assert dead.any() and not dead.all()
    torch.testing.assert_close(torch.from_numpy(std).double(), torch.where(dead, torch.ones_like(sd), sd),
                               rtol=1e-4, atol=1e-6)
    query_x = torch.stack([dm.query[i][0] for i in range(len(dm.split.query))]).double()
    assert not torch.allclose(query_x.mean(0), train_x.mean(0), atol=1e-4)  # queries are not in the statistics

    results = train(cfg)
    run = load_run(results["last_checkpoint"])
    first = run.module.net.backbone
    torch.testing.assert_close(first.mean, torch.from_numpy(mean))
    torch.testing.assert_close(first.std, torch.from_numpy(std))
    # The module on raw features == its heads on (x - mean) / std.
    x = dm.query[0][0][None]
    z = (x - first.mean) / first.std
    heads = run.module.net
    torch.testing.assert_close(run.module(x), torch.sigmoid(heads.hash_head.pre_activation(heads.shared(z))))
    # An image file goes backbone -> standardise -> heads.
    torch.manual_seed(0)
    backbone = build_backbone("small_cnn", "none")[0].eval()
    from dsrh_lightning.data.transforms import build_transform
    image = build_transform(32, 32, False, False)(dm.source.images[int(dm.split.query[0])])[None]
    with torch.no_grad():
        torch.testing.assert_close(encoder(run)(image), run.module(backbone(image)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(encoder(run)(image), run.module(x), rtol=1e-4, atol=1e-5)
    # Without the option the cached features reach the heads unchanged.
    plain = HashingDataModule(load_config(feature_overrides), backbone_factory=build_backbone)
    plain.setup("fit")
    assert plain.feature_stats is None


def test_feature_norm_needs_cached_features(tiny_overrides):
    from dsrh_lightning.config import ConfigError

    with pytest.raises(ConfigError, match="data.feature_norm=standardize.*data.cache_features=true"):
        load_config(tiny_overrides + ["data.feature_norm=standardize"])
    with pytest.raises(ConfigError, match="data.feature_norm='zscore'"):
        load_config(tiny_overrides + ["data.cache_features=true", "data.feature_norm=zscore"])


class _StopAfter(nn.Module):
    """A backbone that raises KeyboardInterrupt (Ctrl-C) on its ``stop``-th call; counts its calls."""

    def __init__(self, net: nn.Module, stop: int = 0) -> None:
        super().__init__()
        self.net, self.stop, self.calls = net, stop, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == self.stop:
            raise KeyboardInterrupt
        return self.net(x)


def test_interrupted_extraction_resumes_to_the_same_cache(tmp_path, capsys):
    images = np.random.default_rng(1).integers(0, 255, (50, 8, 8, 3), dtype=np.uint8)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(8 * 8 * 3, 6), nn.Tanh())
    tf = lambda im: torch.as_tensor(im, dtype=torch.float32).permute(2, 0, 1) / 255
    needed = np.arange(3, 47)  # 44 images: chunks of 8 (2 batches of 4) -> 6 chunks, the last one of 4
    kw = dict(batch_size=4, progress=False, chunk_size=8)
    ref, ref_idx = features_mod.load_or_extract_features(tmp_path / "a.npz", needed, lambda: _StopAfter(net),
                                                         images, tf, {"k": 1}, **kw)
    assert ref.shape == (44, 6) and not (tmp_path / "a.npz.parts").exists()
    # Ctrl-C in the 6th batch (chunk 2's second): chunks 0 and 1 are kept, one line says so, exit code 130.
    path = tmp_path / "b.npz"
    with pytest.raises(features_mod.ExtractionInterrupted) as stop:
        features_mod.load_or_extract_features(path, needed, lambda: _StopAfter(net, stop=6), images, tf,
                                              {"k": 1}, **kw)
    assert stop.value.code == 130 and "2 of 6 chunks kept" in stop.value.message
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [stop.value.message]
    assert not path.exists()
    assert sorted(p.name for p in (tmp_path / "b.npz.parts").iterdir()) == [
        "chunk-00000.npy", "chunk-00001.npy", "manifest.json"]  # no temporary file of chunk 2 is left
    # Restarted: only the 4 missing chunks are extracted (7 batches), and the cache equals the uninterrupted one.
    again = _StopAfter(net)
    feats, idx = features_mod.load_or_extract_features(path, needed, lambda: again, images, tf, {"k": 1}, **kw)
    assert again.calls == 7
    np.testing.assert_array_equal(feats, ref)
    np.testing.assert_array_equal(idx, ref_idx)
    with np.load(path) as a, np.load(tmp_path / "a.npz") as b:
        np.testing.assert_array_equal(a["features"], b["features"])
        np.testing.assert_array_equal(a["indices"], b["indices"])
    assert not (tmp_path / "b.npz.parts").exists()


def test_chunks_of_another_extraction_are_not_reused(tmp_path):
    images = np.random.default_rng(2).integers(0, 255, (20, 4, 4, 3), dtype=np.uint8)
    tf = lambda im: torch.as_tensor(im, dtype=torch.float32).flatten()
    first = nn.Linear(48, 3)
    path = tmp_path / "c.npz"
    with pytest.raises(features_mod.ExtractionInterrupted):
        features_mod.load_or_extract_features(path, np.arange(20), lambda: _StopAfter(first, stop=3), images, tf,
                                              {"weights": "one"}, batch_size=4, progress=False, chunk_size=4)
    # Another extraction (different metadata, e.g. other weights) into the same path starts over.
    second = nn.Linear(48, 3)
    feats, _ = features_mod.load_or_extract_features(path, np.arange(20), lambda: second, images, tf,
                                                     {"weights": "two"}, batch_size=4, progress=False, chunk_size=4)
    with torch.no_grad():
        want = second(torch.stack([tf(im) for im in images])).numpy()
    np.testing.assert_allclose(feats, want, rtol=1e-6, atol=1e-6)


def test_ctrl_c_during_extraction_ends_dsrh_train_with_one_line(feature_overrides, monkeypatch, capsys, tmp_path):
    from dsrh_lightning.cli import main

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(features_mod, "extract_features", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        main(["train", *feature_overrides])
    assert stop.value.code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [stop.value.message]
    assert stop.value.message.startswith("feature extraction interrupted: 0 of 1 chunks kept in ")
    assert stop.value.message.endswith(".npz.parts; run the same command again to continue")
    assert not (tmp_path / "runs" / "smoke").exists()  # a failed start leaves no run folder


def test_extraction_finished_by_another_process_is_read(tmp_path, monkeypatch):
    """Two DDP ranks extract the same cache without coordination: the one whose chunks vanish (the other
    finished, wrote the cache and removed them) reads the finished cache instead of failing."""
    images = np.random.default_rng(4).integers(0, 255, (12, 4, 4, 3), dtype=np.uint8)
    tf = lambda im: torch.as_tensor(im, dtype=torch.float32).flatten()
    net = nn.Linear(48, 3)
    path = tmp_path / "d.npz"
    kw = dict(batch_size=4, progress=False, chunk_size=4)
    other, _ = features_mod.load_or_extract_features(tmp_path / "other.npz", np.arange(12), lambda: net, images,
                                                     tf, {}, **kw)

    class OtherRankFinishes(nn.Module):
        def forward(self, x):  # while this rank extracts its first batch, the other rank completes the cache
            import shutil
            shutil.copy(tmp_path / "other.npz", path)
            shutil.rmtree(tmp_path / "d.npz.parts")
            return torch.zeros(len(x), 3)

    feats, idx = features_mod.load_or_extract_features(path, np.arange(12), lambda: OtherRankFinishes(), images,
                                                       tf, {}, **kw)
    np.testing.assert_array_equal(feats, other)  # the other rank's cache, not this rank's zeros
    np.testing.assert_array_equal(idx, np.arange(12))
