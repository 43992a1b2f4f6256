"""The hash function from Python (runs/hasher.py): the same picture gets the same code whatever form it
comes in (file, PIL image, uint8 array, float tensor, cached feature) and whichever path encodes it
(``dsrh index split=...``, ``dsrh index FOLDER``, ``Hasher``); images of any size are resized; huge ones
are refused from their header."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from dsrh_lightning import cli
from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import HashingDataModule
from dsrh_lightning.models import build_backbone
from dsrh_lightning.search import read_codes
from dsrh_lightning.search.images import ImageInputError, load_image
from dsrh_lightning.search.preprocess import EvalPreprocess

TINY = ["dataset=synthetic", "data.synthetic_per_class=20", "data.protocol.query_per_class=2",
        "data.protocol.train_per_class=10", "data.protocol.val_per_class=2", "data.batch_size=8",
        "data.eval_batch_size=16", "trainer.max_steps=2", "trainer.val_check_interval=2",
        "trainer.progress_bar=false", "trainer.accelerator=cpu", "trainer.test_after_fit=false",
        "logger.name=none", "data.num_workers=0", "model.backbone=small_cnn", "model.weights=none"]


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory):
    """A run trained on cached features of images resized from 32 to 48 px (a resize is what made the
    image-file path and the cached path differ)."""
    from dsrh_lightning.runs.train import train

    tmp = tmp_path_factory.mktemp("cached")
    cfg = load_config(TINY + [f"output_dir={tmp}", "name=feat", "data.image_size=48", "data.cache_features=true",
                              f"data.feature_dir={tmp / 'features'}", f"data.split_dir={tmp / 'splits'}"])
    return Path(train(cfg)["last_checkpoint"]), tmp


def _png_header_claiming(path: Path, width: int, height: int) -> None:
    """Rewrite the IHDR of the PNG at ``path`` to claim ``width`` x ``height`` (valid CRC; data unchanged)."""
    raw = bytearray(path.read_bytes())
    start = 8 + 8  # signature, then length + "IHDR"
    ihdr = bytearray(raw[start:start + 13])
    ihdr[0:8] = struct.pack(">II", width, height)
    raw[start:start + 13] = ihdr
    raw[start + 13:start + 17] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)) & 0xFFFFFFFF)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("extra", [[], ["data.image_size=48"], ["data.image_size=48", "data.augment_on=worker"],
                                   ["data.augment_on=worker"]])
def test_preprocess_equals_the_data_modules_evaluation_images(extra):
    """EvalPreprocess on the raw pictures gives the data module's evaluation tensors bit for bit."""
    cfg = load_config(TINY + extra)
    dm = HashingDataModule(cfg)
    dm.setup("test")
    pre = EvalPreprocess(cfg)
    rows = np.arange(6)
    batch = dm.on_after_batch_transfer(dm.query.fetch(rows), 0)[0]
    pics = [dm.source.images[dm.split.query[r]] for r in rows]
    assert pre.size == batch.shape[-1] == (48 if "data.image_size=48" in extra else 32)
    torch.testing.assert_close(pre.batch(pics), batch, rtol=0, atol=0)
    for r in rows:
        torch.testing.assert_close(pre.one(pics[r]), batch[r], rtol=0, atol=0)


@pytest.mark.parametrize("augment_on", ["device", "worker"])
def test_preprocess_equals_the_data_modules_for_image_files_of_mixed_sizes(tmp_path, augment_on):
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 40), (23, 57), (100, 31), (64, 64)]
    lines = []
    for n in range(16):
        h, w = sizes[n % len(sizes)]
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{n}.png")
        lines.append(f"{n}.png {n % 2}")
    (tmp_path / "train.txt").write_text("\n".join(lines[:8]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(lines[8:12]) + "\n")
    (tmp_path / "database.txt").write_text("\n".join(lines[:8] + lines[12:]) + "\n")
    cfg = load_config(["dataset=custom", f"data.root={tmp_path}", "data.train_list=train.txt",
                       "data.query_list=test.txt", "data.database_list=database.txt", "data.protocol.val_per_class=1",
                       "data.protocol.val_database_size=0", "data.image_size=40", f"data.augment_on={augment_on}",
                       "model.backbone=small_cnn", "model.weights=none", "data.num_workers=0",
                       f"data.split_dir={tmp_path / 'splits'}"])
    dm = HashingDataModule(cfg)
    dm.setup("test")
    pre = EvalPreprocess(cfg)
    rows = np.arange(len(dm.split.query))
    batch = dm.on_after_batch_transfer(dm.query.fetch(rows), 0)[0]
    pics = [load_image(tmp_path / dm.source.images.paths[j]) for j in dm.split.query]
    assert len({p.shape for p in pics}) > 1  # mixed sizes
    torch.testing.assert_close(pre.batch(pics), batch, rtol=0, atol=0)


def test_the_same_picture_gets_the_same_code_in_all_five_forms(cached_run, tmp_path, capsys):
    from PIL import Image

    from dsrh_lightning.runs.hasher import Hasher

    ckpt, _ = cached_run
    hasher = Hasher.from_checkpoint(ckpt)
    assert hasher.image_size == 48 and hasher.run.feature_dim
    out = tmp_path / "db.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(out), "split=database", "--no-progress"]) == 0, \
        capsys.readouterr().err
    split_codes = read_codes(out)
    dm = HashingDataModule(hasher.cfg, backbone_factory=build_backbone)
    dm.setup("test")
    picks = np.arange(0, len(dm.split.database), 5)
    pics = np.stack([dm.source.images[dm.split.database[p]] for p in picks])
    folder = tmp_path / "pngs"
    folder.mkdir()
    paths = []
    for n, pic in enumerate(pics):
        paths.append(folder / f"{n:03d}.png")
        Image.fromarray(pic).save(paths[-1])
    expected = split_codes.packed[picks]
    forms = {
        "files": hasher.encode([str(p) for p in paths]),
        "folder": hasher.encode(folder),
        "pil": hasher.encode([Image.open(p) for p in paths]),
        "uint8 array batch": hasher.encode(pics),
        "uint8 arrays": np.concatenate([hasher.encode(p) for p in pics]),
        "float tensors": hasher.encode(torch.from_numpy(pics).permute(0, 3, 1, 2).float() / 255),
        "cached features": hasher.encode_features(np.stack([dm.database[int(p)][0].numpy() for p in picks])),
    }
    for name, codes in forms.items():
        np.testing.assert_array_equal(codes, expected, err_msg=name)
    np.testing.assert_array_equal(hasher.encode(pics, unpacked=True), split_codes.unpacked()[picks])
    # dsrh index FOLDER agrees too.
    out2 = tmp_path / "files.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(out2), str(folder), "--no-progress"]) == 0
    np.testing.assert_array_equal(read_codes(out2).packed, expected)
    # Searching the split's index with the files finds each picture at distance 0.
    res = hasher.search(out, paths[:3], k=1)
    assert res.distances[:, 0].tolist() == [0, 0, 0]
    np.testing.assert_array_equal(split_codes.packed[res.indices[:, 0]], expected[:3])
    with pytest.raises(ImageInputError, match="encode_features"):
        hasher.encode(np.zeros((3, int(hasher.run.feature_dim)), np.float32))


def test_mixed_sizes_are_resized_and_huge_images_refused_from_the_header(cached_run, tmp_path, capsys):
    from PIL import Image

    from dsrh_lightning.runs.hasher import Hasher

    ckpt, _ = cached_run
    hasher = Hasher.from_checkpoint(ckpt)
    rng = np.random.default_rng(1)
    pics = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in [(32, 32), (300, 17), (9, 120), (48, 48)]]
    together = hasher.encode(pics)
    alone = np.concatenate([hasher.encode(p) for p in pics])
    np.testing.assert_array_equal(together, alone)
    assert together.shape == (4, (hasher.bits + 7) // 8)

    big = tmp_path / "big.png"
    Image.fromarray(pics[0]).save(big)
    _png_header_claiming(big, 13000, 13000)
    with pytest.raises(ImageInputError, match="169,000,000 pixels is more than the limit"):
        load_image(big)
    small_limit = Hasher.from_checkpoint(ckpt, max_pixels=32 * 32 - 1)
    with pytest.raises(ImageInputError, match="more than the limit of 1,023"):
        small_limit.encode(pics[0])
    rc = cli.main(["index", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), str(big), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "pixels is more than the limit" in err and "Traceback" not in err
    from dsrh_lightning.search import write_codes

    write_codes(tmp_path / "db.npz", hasher.encode(pics, unpacked=True), ["a", "b", "c", "d"])
    rc = cli.main(["search", "--index", str(tmp_path / "db.npz"), "--ckpt", str(ckpt), str(big)])
    err = capsys.readouterr().err
    assert rc == 2 and "pixels is more than the limit" in err and "Traceback" not in err


def test_index_searches_a_codes_file_and_a_sharded_folder_alike(tmp_path):
    """Index(...).search: exact top k by (distance, position), packed or unpacked queries, ids and labels
    looked up in the shards that hold them; checked against a brute-force loop."""
    from dsrh_lightning.search import write_codes
    from dsrh_lightning.search.index import Index
    from dsrh_lightning.search.shards import write_sharded

    rng = np.random.default_rng(3)
    bits, n = 13, 500
    centres = rng.integers(0, 2, (6, bits), dtype=np.uint8)
    db = centres[rng.integers(0, 6, n)] ^ (rng.random((n, bits)) < 0.1).astype(np.uint8)  # many ties
    ids = [f"toy#{j}" for j in range(n)]  # in-memory style ids (relative paths resolve against the file)
    labels = rng.integers(0, 4, n)
    write_codes(tmp_path / "db.npz", db, ids, labels)
    write_sharded(tmp_path / "db_sharded", db, ids, labels, shard_size=64)
    q = db[[3, 77, 400]] ^ np.eye(3, bits, dtype=np.uint8)
    k = 40
    for path in ("db.npz", "db_sharded"):
        index = Index(tmp_path / path)
        assert len(index) == n and index.bits == bits
        for query in (q, np.packbits(q, axis=1)):
            res = index.search(query, k)
            for r in range(len(q)):
                dist = [int((q[r] != db[j]).sum()) for j in range(n)]
                order = sorted(range(n), key=lambda j: (dist[j], j))[:k]
                assert res.indices[r].tolist() == order
                assert res.distances[r].tolist() == [dist[j] for j in order]
                assert res.ids[r].tolist() == [ids[j] for j in order]
                assert res.labels[r].tolist() == [int(labels[j]) for j in order]


def test_cifar10_pngs_get_the_input_of_the_cached_path(tmp_path):
    """The issue's case on real CIFAR-10 images: a run on cached features at 128 px. PNG files of test
    images, read back, get exactly the batch transform's input (what the feature cache was extracted
    from); the former image-file path (torchvision's uint8 resize) gives other pixels for most of them."""
    from PIL import Image

    from conftest import shared_data_dir
    from dsrh_lightning.data.sources import load_cifar10
    from dsrh_lightning.data.transforms import BatchTransform, build_transform

    root = shared_data_dir() / "cifar10"
    cfg = load_config(["dataset=cifar10", f"data.root={root}", "data.cache_features=true", "data.image_size=128",
                       "model.backbone=small_cnn", "model.weights=none"])
    pre = EvalPreprocess(cfg)
    assert (pre.size, pre.path) == (128, "batch")
    pics = load_cifar10(root, download=False).images[:30]
    loaded = []
    for n, pic in enumerate(pics):
        Image.fromarray(pic).save(tmp_path / f"{n}.png")
        loaded.append(load_image(tmp_path / f"{n}.png"))
    np.testing.assert_array_equal(np.stack(loaded), pics)  # PNG is lossless
    cached_input = BatchTransform(128, 32, False, False)(torch.from_numpy(pics))
    torch.testing.assert_close(pre.batch(loaded), cached_input, rtol=0, atol=0)
    former = build_transform(128, 32, False, False)
    differ = sum(not torch.equal(former(p), cached_input[i]) for i, p in enumerate(loaded))
    assert differ >= 15, differ


@pytest.mark.parametrize("overrides,size,path", [
    (["dataset=cifar10_multilabel", "model.weights=none"], 64, "batch"),  # 2 x 2 tiles of 32 px
    (["dataset=cifar10_multilabel", "model.weights=none", "data.mosaic_grid=3"], 96, "batch"),
    (["dataset=cifar10", "model.weights=none"], 32, "batch"),
    (["dataset=cifar10", "model.weights=imagenet", "model.backbone=vgg19"], 224, "batch"),
    (["dataset=cifar10", "model.weights=none", "data.augment_on=worker"], 32, "per-image"),
    (["dataset=nuswide", "model.weights=none", "model.backbone=small_cnn"], 224, "resize+batch"),
])
def test_input_size_and_path_from_the_config_alone(overrides, size, path):
    """The preprocessing is decided from the saved config, without loading the data set: the input size of
    in-memory data sets is their native size (mosaics: grid x 32) unless resized for ImageNet weights."""
    pre = EvalPreprocess(load_config(overrides))
    assert (pre.size, pre.path) == (size, path)


def test_index_keeps_a_sharded_index_in_memory_between_searches(tmp_path, monkeypatch):
    """Index(path) reads and checks the shards' codes once: later searches read only the ids they return."""
    from dsrh_lightning.search import shards
    from dsrh_lightning.search.index import Index

    rng = np.random.default_rng(1)
    db = rng.integers(0, 2, (300, 24)).astype(np.uint8)
    shards.write_sharded(tmp_path / "db", db, [f"x{i}" for i in range(300)], shard_size=64)
    reads = []
    real = shards._load_keys
    monkeypatch.setattr(shards, "_load_keys", lambda path, keys: reads.append(tuple(keys)) or real(path, keys))
    index = Index(tmp_path / "db")
    q = rng.integers(0, 2, (5, 24)).astype(np.uint8)
    first = index.search(q, k=7)
    code_reads = sum("packed" in k for k in reads)
    assert code_reads == 5  # each of the 5 shards once
    again = index.search(q, k=7)
    assert sum("packed" in k for k in reads) == code_reads  # no shard's codes read again
    assert np.array_equal(first.indices, again.indices) and np.array_equal(first.distances, again.distances)
    assert [Path(s).name for s in again.ids[0]] == [f"x{i}" for i in again.indices[0]]
    # the reference: distances by a loop, ties by position
    d = (q[:, None, :] != db[None]).sum(-1)
    order = np.lexsort((np.broadcast_to(np.arange(300), d.shape), d), axis=1)[:, :7]
    assert np.array_equal(first.indices, order)
