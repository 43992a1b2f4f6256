"""Device-side batched augmentation (data.augment_on=device) and batched fetch: per-item determinism
whatever the batch, resume, DDP shares, statistics equal to the torchvision worker path, and batched
fetch equal to item-by-item collation."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.data.datasets import IndexedImageDataset, RawImages, TripletDataset
from dsrh_lightning.data.features import FeatureRows
from dsrh_lightning.data.transforms import BatchTransform, build_transform
from dsrh_lightning.seeding import item_seed


def _images(n=24, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _finish(ds, batch):
    raw = batch[0]
    assert isinstance(raw, RawImages) and raw.pixels.dtype == torch.uint8
    tf = ds.batch_transform
    out = tf(raw.pixels.reshape(-1, *raw.pixels.shape[-3:]), raw.params)
    return out.reshape(*raw.lead, *out.shape[1:])


@pytest.mark.parametrize("size", [32, 48, 24])
def test_item_result_independent_of_batch_composition(size):
    images = _images()
    tf = BatchTransform(size, 32, train=True, augment=True)
    ds = IndexedImageDataset(images, np.arange(24) % 4, np.arange(24), None, seed=7, batch_transform=tf)
    whole = _finish(ds, ds.fetch(range(24)))
    assert whole.shape == (24, 3, size, size)
    part = _finish(ds, ds.fetch([20, 3, 11]))
    torch.testing.assert_close(part, whole[[20, 3, 11]])
    # A single item (dataset[i], finished on the CPU) is the same as inside any batch.
    torch.testing.assert_close(ds[11][0], whole[11])
    # The global generator neither matters nor is touched.
    state = torch.get_rng_state()
    torch.manual_seed(123)
    torch.testing.assert_close(_finish(ds, ds.fetch([3])), whole[[3]])
    torch.set_rng_state(state)
    # Params are a pure function of (seed, epoch, item): redrawn per epoch, back again on set_epoch (resume).
    p0 = ds.fetch(range(24))[0].params
    ds.set_epoch(1)
    p1 = ds.fetch(range(24))[0].params
    assert not torch.equal(p0, p1)
    fresh = IndexedImageDataset(images, np.arange(24) % 4, np.arange(24), None, seed=7, batch_transform=tf)
    fresh.set_epoch(1)
    assert torch.equal(fresh.fetch(range(24))[0].params, p1)
    ds.set_epoch(0)
    assert torch.equal(ds.fetch(range(24))[0].params, p0)


def test_params_seeded_by_item_seed_with_explicit_generator():
    images = _images(4)
    tf = BatchTransform(32, 32, train=True, augment=True)
    ds = IndexedImageDataset(images, np.zeros(4), np.arange(4), None, seed=3, batch_transform=tf)
    ds.set_epoch(2)
    got = ds.fetch([1])[0].params[0]
    ref = tf.draw(torch.Generator().manual_seed(item_seed(3, 2, 1, 0)), 32, 32)
    assert torch.equal(got, ref)


def test_eval_path_equals_torchvision_transform():
    images = _images(6)
    for size in (32, 64, 20):
        ref = torch.stack([build_transform(size, 32, False, False)(im) for im in images])
        got = BatchTransform(size, 32, False, False)(torch.from_numpy(images))
        # Resizing rounds to integers like torchvision's (fixed-point) uint8 path: at most one grey level
        # apart, half a level on average; no resize (32 px) is exact.
        level = 1 / 255 / 0.224
        assert (got - ref).abs().max() <= 1.01 * level, size
        assert (got - ref).abs().mean() < 0.5 * level
        if size == 32:
            torch.testing.assert_close(got, ref)


def test_crop_path_equals_torchvision_for_the_same_offsets():
    """At the native size the device crop is torchvision's RandomCrop(pad reflect) + flip, exactly."""
    import torchvision.transforms.v2.functional as TF

    images = _images(8)
    tf = BatchTransform(32, 32, True, True)
    params = torch.stack([tf.draw(torch.Generator().manual_seed(i), 32, 32) for i in range(8)])
    got = tf(torch.from_numpy(images), params)
    ref = []
    for im, (top, left, h, w, flip) in zip(images, params.tolist()):
        x = TF.pad(torch.from_numpy(im).permute(2, 0, 1), [4], padding_mode="reflect")
        x = x[:, int(top):int(top) + 32, int(left):int(left) + 32]
        if flip:
            x = x.flip(-1)
        ref.append(build_transform(32, 32, False, False)(x.permute(1, 2, 0).numpy()))
    torch.testing.assert_close(got, torch.stack(ref))


@pytest.mark.parametrize("size", [32, 48])
def test_statistics_match_the_worker_transform(size):
    """Crop offsets, flip rate and output mean/std of the device path match torchvision's random path."""
    n = 600
    images = _images(n, seed=1)
    tf = BatchTransform(size, 32, True, True)
    dev = IndexedImageDataset(images, np.zeros(n), np.arange(n), None, seed=0, batch_transform=tf)
    out_dev = _finish(dev, dev.fetch(range(n)))
    wrk = IndexedImageDataset(images, np.zeros(n), np.arange(n), build_transform(size, 32, True, True), seed=0)
    out_wrk = torch.stack([wrk[i][0] for i in range(n)])
    assert out_dev.shape == out_wrk.shape
    for dim in [(0, 2, 3)]:
        torch.testing.assert_close(out_dev.mean(dim), out_wrk.mean(dim), atol=0.03, rtol=0)
        torch.testing.assert_close(out_dev.std(dim), out_wrk.std(dim), atol=0.03, rtol=0)
    params = dev.fetch(range(n))[0].params
    assert abs(params[:, 4].mean().item() - 0.5) < 0.07  # flip rate (binomial sd 0.02)
    if size == 32:  # padded crop: offsets uniform on 0..8 (mean 4, variance 80/12)
        offs = params[:, :2]
        assert offs.min() == 0 and offs.max() == 8
        assert abs(offs.mean().item() - 4) < 0.3 and abs(offs.var().item() - 80 / 12) < 0.8
    else:  # random-resized crop: area fraction in [0.6, 1], mean near 0.8 (clipped by the fit test)
        area = params[:, 2] * params[:, 3] / (32 * 32)
        assert area.min() >= 0.55 and area.max() <= 1.0 and abs(area.mean().item() - 0.8) < 0.06


def test_triplet_fetch_equals_items_and_ddp_shares():
    images = _images(40)
    labels = np.arange(40) % 4
    tf = BatchTransform(32, 32, True, True)
    base = IndexedImageDataset(images, labels, np.arange(40), None, seed=2, batch_transform=tf)
    trip = TripletDataset(base, 1, seed=2)
    x, y = trip.fetch([5, 1, 9])
    assert x.lead == (3, 3) and y.shape == (3, 3)
    imgs = _finish(base, (x,))
    assert imgs.shape == (3, 3, 3, 32, 32)
    for k, i in enumerate([5, 1, 9]):
        xi, yi = trip[i]
        torch.testing.assert_close(imgs[k], xi)
        assert torch.equal(y[k], yi)
    # DDP: a rank's share decides which items it sees; an item's augmentation does not depend on the rank.
    from dsrh_lightning.data.distributed import EpochBatchSampler

    shares = [EpochBatchSampler(len(trip), 4, seed=2, rank=r, world_size=2) for r in range(2)]
    single = EpochBatchSampler(len(trip), 4, seed=2)
    by_item = {}
    for b in single.batches():
        for i, im in zip(b, _finish(base, (trip.fetch(b)[0],))):
            by_item[i] = im
    seen = set()
    for s in shares:
        for b in s.batches():
            for i, im in zip(b, _finish(base, (trip.fetch(b)[0],))):
                seen.add(i)
                if i in by_item:
                    torch.testing.assert_close(im, by_item[i])
    assert len(seen) == sum(len(s) for s in shares) * 4


def test_cached_features_fetch_is_one_gather_and_equals_collated_items(monkeypatch):
    feats = np.random.default_rng(0).normal(size=(30, 5)).astype(np.float32)
    idx = np.arange(0, 60, 2)
    rows = FeatureRows(feats, idx, 60)
    labels = np.arange(60) % 3
    ds = IndexedImageDataset(rows, labels, idx[::-1].copy(), None, seed=4)
    assert not ds.random
    # No seeding when the transform is not random.
    import dsrh_lightning.data.datasets as mod

    monkeypatch.setattr(mod, "item_seed", lambda *a, **k: (_ for _ in ()).throw(AssertionError("seeded")))
    batch = ds.fetch([0, 7, 3])
    ref = default_collate([ds[i] for i in [0, 7, 3]])
    for a, b in zip(batch, ref):
        assert torch.equal(a, b)
    trip = TripletDataset(ds, 1, seed=4)
    x, y = trip.fetch([2, 0])
    ref = default_collate([trip[i] for i in [2, 0]])
    assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])


def test_datamodule_device_batches_match_worker_eval_and_loader(tiny_overrides):
    dev = HashingDataModule(load_config(tiny_overrides + ["data.augment_on=device", "data.num_workers=0"]))
    wrk = HashingDataModule(load_config(tiny_overrides + ["data.augment_on=worker", "data.num_workers=0"]))
    dev.setup("fit")
    wrk.setup("fit")
    qd = dev.on_after_batch_transfer(next(iter(dev.val_dataloader()[0])), 0)
    qw = next(iter(wrk.val_dataloader()[0]))
    assert qd[0].dtype == torch.float32 and qd[0].shape == qw[0].shape
    assert (qd[0] - qw[0]).abs().max() <= 1.01 / 255 / 0.224
    assert torch.equal(qd[1], qw[1]) and torch.equal(qd[2], qw[2])
    # Training: same triplets and labels as the worker path; images augmented on the device.
    td = dev.on_after_batch_transfer(next(iter(dev.train_dataloader())), 0)
    tw = next(iter(wrk.train_dataloader()))
    assert td[0].shape == tw[0].shape and torch.equal(td[1], tw[1])


def test_image_files_decode_in_workers_and_normalise_on_device():
    """Images of varying size (image files): geometry per item in the worker (uint8), normalisation on the
    device; equal to the former all-in-the-worker transform for the same item seeds."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(30, 41), (50, 28), (24, 24), (33, 60)]]
    labels = np.arange(4)
    geo = build_transform(24, None, True, True, normalize=False)
    dev = IndexedImageDataset(images, labels, np.arange(4), geo, seed=9,
                              batch_transform=BatchTransform(24, 24, False, False), random=True)
    old = IndexedImageDataset(images, labels, np.arange(4), build_transform(24, None, True, True), seed=9)
    batch = dev.fetch([2, 0, 3])
    raw = batch[0]
    assert raw.pixels.dtype == torch.uint8 and raw.pixels.shape == (3, 24, 24, 3) and raw.params is None
    got = dev.batch_transform(raw.pixels)
    ref = torch.stack([old[i][0] for i in [2, 0, 3]])
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(dev[0][0], ref[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batch_equals_cpu_batch():
    images = torch.from_numpy(_images(16))
    for size, native in [(32, 32), (64, 32)]:
        tf = BatchTransform(size, native, True, True)
        params = torch.stack([tf.draw(torch.Generator().manual_seed(i), 32, 32) for i in range(16)])
        cpu = tf(images, params)
        gpu = tf(images.cuda(), params.cuda()).cpu()
        torch.testing.assert_close(gpu, cpu, atol=1e-4, rtol=0)
