"""List files: parsing, every bad-input case named by file and line, skip policy, merging lists."""

import numpy as np
import pytest

from dsrh_lightning.config import load_config
from dsrh_lightning.data.datamodule import load_source, make_split
from dsrh_lightning.data.image_list import ImageFiles, ImageListError, check_images, read_image_list
from dsrh_lightning.data.synthetic_folder import write_synthetic_list_dataset


def _write(tmp_path, text, name="list.txt"):
    f = tmp_path / name
    f.write_text(text)
    return f


def _touch_images(tmp_path, names):
    from PIL import Image

    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / n)


def test_parse_multihot_and_class_ids(tmp_path):
    lst = read_image_list(_write(tmp_path, "a.jpg 1 0 1\nb.jpg 0 1 0\n"), tmp_path)
    assert lst.paths == ["a.jpg", "b.jpg"] and lst.labels.tolist() == [[1, 0, 1], [0, 1, 0]]
    lst = read_image_list(_write(tmp_path, "a.jpg 3\n\nb.jpg 0\n"), tmp_path)
    assert lst.labels.tolist() == [3, 0] and not lst.multilabel


@pytest.mark.parametrize("text, line, fragment", [
    ("a.jpg 1 0 1\nb.jpg 0 1\n", 2, "has 2 label values, expected 3"),
    ("a.jpg 1 0 1\nb.jpg 0 0 0\n", 2, "no positive label"),
    ("a.jpg 1 0 1\nb.jpg\n", 2, "has no label"),
    ("a.jpg 1 0 1\nb.jpg 1 2 0\n", 2, "must be 0/1"),
    ("a.jpg 1 0 1\na.jpg 1 0 1\n", 2, "repeats line 1"),
    ("a.jpg 1 0 1\n../escape.jpg 1 0 0\n", 2, "escapes the data root"),
    ("/etc/passwd 1 0 0\n", 1, "escapes the data root"),
    ("a.jpg x y z\n", 1, "not integers"),
])
def test_bad_lines_name_file_and_line(tmp_path, text, line, fragment):
    f = _write(tmp_path, text)
    with pytest.raises(ImageListError) as err:
        read_image_list(f, tmp_path)
    assert f"{f}:{line}:" in str(err.value) and fragment in str(err.value)


def test_expected_width_from_config(tmp_path):
    with pytest.raises(ImageListError, match="expected 21"):
        read_image_list(_write(tmp_path, "a.jpg 1 0 1\n"), tmp_path, num_labels=21)


def test_skip_policy_drops_and_records(tmp_path):
    f = _write(tmp_path, "a.jpg 1 0 1\nb.jpg 0 1\nc.jpg 0 0 0\nd.jpg 0 1 0\n")
    lst = read_image_list(f, tmp_path, on_bad="skip")
    assert lst.paths == ["a.jpg", "d.jpg"]
    assert [n for n, _ in lst.skipped] == [2, 3]
    # Duplicates stay errors even when skipping (they usually mean a broken list).
    with pytest.raises(ImageListError):
        read_image_list(_write(tmp_path, "a.jpg 1 0\na.jpg 1 0\n"), tmp_path, on_bad="skip")


def test_missing_and_unreadable_images(tmp_path):
    _touch_images(tmp_path, ["ok.png"])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    files = ImageFiles(tmp_path, ["ok.png", "missing.png", "broken.png"])
    with pytest.raises(ImageListError, match="missing.png is missing"):
        check_images(files, "exists")
    assert check_images(files, "exists", on_bad="skip") == [1]
    assert check_images(files, "header", on_bad="skip") == [1, 2]
    with pytest.raises(ImageListError, match="broken.png is unreadable"):
        check_images(ImageFiles(tmp_path, ["ok.png", "broken.png"]), "header")
    with pytest.raises(ImageListError, match="broken.png cannot be decoded"):
        files[2]
    assert files[0].shape == (8, 8, 3)


def _custom_cfg(root, **extra):
    over = ["dataset=custom", f"data.root={root}", "data.train_list=train.txt", "data.query_list=test.txt",
            "data.database_list=database.txt", "data.protocol.val_per_class=3", "data.protocol.val_database_size=0"]
    return load_config(over + [f"{k}={v}" for k, v in extra.items()])


def test_custom_lists_give_the_split(tmp_path):
    lists = write_synthetic_list_dataset(tmp_path, num_labels=6, n=120, query=20, train=50)
    cfg = _custom_cfg(tmp_path)
    source, part = load_source(cfg.data, seed=0)
    split = make_split(source, part, cfg.data)
    assert len(source.images) == 120 and source.labels.shape == (120, 6)
    assert len(split.query) == 20 and len(split.database) == 100 and len(split.train) == 50
    assert np.isin(split.train, split.database).all()
    assert len(np.intersect1d(split.val, split.train)) == 0 and len(np.intersect1d(split.val, split.query)) == 0
    # Positions map back to the right list lines.
    q_paths = [l.split()[0] for l in lists["test"].read_text().splitlines()]
    assert sorted(source.images.paths[i] for i in split.query) == sorted(q_paths)


def test_conflicting_labels_between_lists(tmp_path):
    write_synthetic_list_dataset(tmp_path, num_labels=4, n=40, query=10, train=10)
    lines = (tmp_path / "train.txt").read_text().splitlines()
    path, *vals = lines[0].split()
    flipped = [str(1 - int(v)) for v in vals]
    if not any(int(v) for v in flipped):
        flipped[0] = "1"
    lines[0] = " ".join([path] + flipped)
    (tmp_path / "train.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(ImageListError, match=path):
        load_source(_custom_cfg(tmp_path).data, seed=0)


def test_overlapping_query_and_database_is_an_error(tmp_path):
    write_synthetic_list_dataset(tmp_path, num_labels=4, n=40, query=10, train=10)
    extra = (tmp_path / "test.txt").read_text().splitlines()[0]
    with open(tmp_path / "database.txt", "a") as fh:
        fh.write(extra + "\n")
    cfg = _custom_cfg(tmp_path)
    source, part = load_source(cfg.data, seed=0)
    with pytest.raises(ValueError, match="both queries and database"):
        make_split(source, part, cfg.data)


def test_missing_list_file_and_missing_root(tmp_path):
    write_synthetic_list_dataset(tmp_path, num_labels=4, n=40, query=10, train=10)
    with pytest.raises(FileNotFoundError, match="query_list"):
        load_source(_custom_cfg(tmp_path, **{"data.query_list": "nope.txt"}).data, seed=0)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_source(_custom_cfg(tmp_path / "absent").data, seed=0)


def test_single_list_split_by_protocol(tmp_path):
    lists = write_synthetic_list_dataset(tmp_path, num_labels=4, n=200, query=10, train=10, multilabel=False)
    all_lines = sum((lists[k].read_text().splitlines() for k in ("test", "database")), [])
    (tmp_path / "all.txt").write_text("\n".join(all_lines) + "\n")
    cfg = load_config(["dataset=custom", f"data.root={tmp_path}", "data.list_file=all.txt",
                       "data.protocol.query_per_class=2", "data.protocol.train_per_class=3",
                       "data.protocol.val_per_class=1", "data.protocol.val_database_size=0"])
    source, part = load_source(cfg.data, seed=0)
    split = make_split(source, part, cfg.data)
    assert source.labels.ndim == 1
    assert (np.bincount(source.labels[split.query]) == 2).all()
    assert (np.bincount(source.labels[split.train]) == 3).all()


def test_nuswide_from_official_files(tmp_path):
    """ImageList/Imagelist.txt + Groundtruth/AllLabels/Labels_<concept>.txt -> seeded per-concept split."""
    from dsrh_lightning.data.list_source import NUSWIDE21_CONCEPTS

    rng = np.random.default_rng(0)
    n = 400
    names = [f"{i:04d}_{1000 + i}.jpg" for i in range(n)]
    (tmp_path / "ImageList").mkdir()
    (tmp_path / "ImageList" / "Imagelist.txt").write_text(
        "\n".join(f"C:\\ImageData\\Flickr\\folder{i % 3}\\{nm}" for i, nm in enumerate(names)) + "\n")
    labels = (rng.random((n, 21)) < 0.25).astype(int)
    labels[5] = 0  # an image with none of the 21 concepts is dropped
    (tmp_path / "Groundtruth" / "AllLabels").mkdir(parents=True)
    for c, concept in enumerate(NUSWIDE21_CONCEPTS):
        (tmp_path / "Groundtruth" / "AllLabels" / f"Labels_{concept}.txt").write_text(
            "\n".join(str(v) for v in labels[:, c]) + "\n")
    _touch_images(tmp_path, [f"Flickr/folder{i % 3}/{nm}" for i, nm in enumerate(names)])
    cfg = load_config(["dataset=nuswide", f"data.root={tmp_path}", "data.protocol.query_per_class=2",
                       "data.protocol.train_per_class=4", "data.protocol.val_per_class=1",
                       "data.protocol.val_database_size=0", "data.split_dir="])
    source, part = load_source(cfg.data, seed=0)
    assert part is None and len(source.images) == n - 1 - int((labels.sum(1) == 0).sum() - 1)
    assert "Flickr/folder0/0000_1000.jpg" in source.images.paths
    assert "Flickr/folder2/0005_1005.jpg" not in source.images.paths
    split = make_split(source, part, cfg.data)
    assert len(split.query) == 42 and len(split.train) == 84
    # A concept file of the wrong length is named in the error.
    (tmp_path / "Groundtruth" / "AllLabels" / "Labels_sky.txt").write_text("1\n0\n")
    with pytest.raises(ImageListError, match="Labels_sky.txt"):
        load_source(cfg.data, seed=0)


def test_nuswide_missing_everything_says_what_to_do(tmp_path):
    cfg = load_config(["dataset=nuswide", f"data.root={tmp_path}"])
    with pytest.raises(FileNotFoundError) as err:
        load_source(cfg.data, seed=0)
    assert "Imagelist.txt" in str(err.value) and "data/README.md" in str(err.value)


def test_extra_column_on_first_line_is_blamed_on_line_1(tmp_path):
    f = _write(tmp_path, "a.jpg 1 0\nb.jpg 2\nc.jpg 0\n")
    with pytest.raises(ImageListError) as err:
        read_image_list(f, tmp_path)
    assert f"{f}:1:" in str(err.value) and "has 2 label values, expected 1" in str(err.value)
    lst = read_image_list(f, tmp_path, on_bad="skip")
    assert lst.paths == ["b.jpg", "c.jpg"] and lst.labels.tolist() == [2, 0] and lst.lines == [2, 3]


def test_absolute_path_inside_the_root_is_accepted(tmp_path):
    f = _write(tmp_path, f"{tmp_path / 'sub' / 'a.jpg'} 1\nb.jpg 0\n")
    lst = read_image_list(f, tmp_path)
    assert lst.paths == ["sub/a.jpg", "b.jpg"]
    # The same file written both ways is a repeat.
    f = _write(tmp_path, f"sub/a.jpg 1\n{tmp_path / 'sub' / 'a.jpg'} 1\n")
    with pytest.raises(ImageListError, match=r":2: .*repeats line 1"):
        read_image_list(f, tmp_path)


def test_utf8_bom_is_accepted_and_latin1_byte_names_the_line(tmp_path):
    f = tmp_path / "bom.txt"
    f.write_bytes(b"\xef\xbb\xbfa.jpg 1\nb.jpg 0\n")
    assert read_image_list(f, tmp_path).paths == ["a.jpg", "b.jpg"]
    f = tmp_path / "latin1.txt"
    f.write_bytes("a.jpg 1\ncaf\u00e9.jpg 0\n".encode("latin-1"))
    with pytest.raises(ImageListError) as err:
        read_image_list(f, tmp_path)
    assert f"{f}:2:" in str(err.value) and "0xe9" in str(err.value) and "UTF-8" in str(err.value)
    assert read_image_list(f, tmp_path, on_bad="skip").paths == ["a.jpg"]


def test_path_with_a_space_is_explained_and_quotes_work(tmp_path):
    f = _write(tmp_path, "a.jpg 1\nmy dir/x.jpg 0\n")
    with pytest.raises(ImageListError) as err:
        read_image_list(f, tmp_path)
    msg = str(err.value)
    assert f"{f}:2:" in msg and "'my dir/x.jpg' seems to contain a space" in msg and "double quotes" in msg
    assert "not integers" not in msg
    lst = read_image_list(_write(tmp_path, 'a.jpg 1\n"my dir/x.jpg" 0\n'), tmp_path)
    assert lst.paths == ["a.jpg", "my dir/x.jpg"] and lst.labels.tolist() == [1, 0]


def test_huge_class_id_is_rejected_with_file_line(tmp_path):
    f = _write(tmp_path, "a.jpg 1\nb.jpg 0\nc.jpg 1000000000\n")
    with pytest.raises(ImageListError) as err:
        read_image_list(f, tmp_path)
    assert f"{f}:3:" in str(err.value) and "1000000000" in str(err.value)
    # Sparse but plausible ids (a list holding a subset of the classes) are fine.
    assert read_image_list(_write(tmp_path, "a.jpg 1\nb.jpg 0\nc.jpg 999\n"), tmp_path).labels.max() == 999


def test_cli_bad_list_exits_2_naming_file_line(tmp_path):
    import subprocess
    import sys

    _touch_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "all.txt").write_text("a.png 0\nb.png 1000000000\n")
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "train", "dataset=custom",
                           f"data.root={tmp_path}", "data.list_file=all.txt", "logger.name=none",
                           f"output_dir={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and f"{tmp_path / 'all.txt'}:2:" in proc.stderr


def _corrupt_png(path):
    """Header intact, pixel data cut short: passes data.check_images=header, fails to decode."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])


def _corrupt_jpeg(path):
    """A JPEG whose scan data is overwritten with 0xff bytes (header intact)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    for k in range(data.index(b"\xff\xda") + 20, len(data) - 2, 7):
        data[k] = 0xFF
    path.write_bytes(bytes(data))


def _decodes(path):
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
    except Exception:
        return False
    return True


@pytest.mark.parametrize("corrupt, name", [(_corrupt_png, "bad.png"), (_corrupt_jpeg, "bad.jpg")])
def test_corrupt_image_data_passes_header_check_and_fails_at_load_with_file_line(tmp_path, corrupt, name):
    _touch_images(tmp_path, ["a.png", "b.png", "c.png", name])
    corrupt(tmp_path / name)
    assert not _decodes(tmp_path / name)
    paths = ["a.png", name, "b.png", "c.png"]
    origins = [f"list.txt:{i}" for i in range(1, 5)]
    files = ImageFiles(tmp_path, paths, origins, np.array([0, 1, 1, 1]))
    assert check_images(files, "header") == []  # the header is fine: this is what let it through before
    with pytest.raises(ImageListError) as err:
        files[1]
    assert "list.txt:2:" in str(err.value) and name in str(err.value) and "data.on_bad=skip" in str(err.value)
    # The full decode check finds it before training.
    with pytest.raises(ImageListError, match=name):
        check_images(files, "decode")


def test_skip_replaces_an_undecodable_image_by_the_next_same_label_same_split_image(tmp_path):
    from PIL import Image

    names = [f"{i}.png" for i in range(6)]
    for i, n in enumerate(names):
        Image.new("RGB", (4, 4), (10 * i, 0, 0)).save(tmp_path / n)
    _corrupt_png(tmp_path / "1.png")
    _corrupt_png(tmp_path / "3.png")
    labels = np.array([0, 1, 0, 1, 1, 1])
    files = ImageFiles(tmp_path, names, [f"l.txt:{i + 1}" for i in range(6)], labels, on_bad="skip")
    # Groups: 5 is a query image, the rest are training images.
    files.set_groups({"query": np.array([5]), "train": np.array([0, 1, 2, 3, 4])})
    # 1 -> next same-label, same-split image that decodes: 2 has label 0, 3 is corrupt, so 4.
    assert files[1][0, 0, 0] == 40 and files.decode_failures == 1
    assert files[1][0, 0, 0] == 40 and files.decode_failures == 1  # cached, counted once
    # 3 -> 4 as well (5 is in the query set and may not stand in for a training image).
    assert files[3][0, 0, 0] == 40 and files.decode_failures == 2
    # A query image with no decodable same-label query image to stand in: an error naming file:line.
    files.set_groups({"query": np.array([0, 3]), "train": np.array([1, 2, 4, 5])})
    with pytest.raises(ImageListError, match="l.txt:4: .*no other decodable image"):
        files[3]
    # Deterministic: a fresh object makes the same choice.
    again = ImageFiles(tmp_path, names, None, labels, on_bad="skip")
    assert again[1][0, 0, 0] == 40


def test_decode_error_inside_a_loader_worker_keeps_one_clean_message(tmp_path):
    import torch

    _touch_images(tmp_path, ["a.png", "bad.png"])
    _corrupt_png(tmp_path / "bad.png")
    files = ImageFiles(tmp_path, ["a.png", "bad.png"], ["x.txt:1", "x.txt:2"])
    loader = torch.utils.data.DataLoader(files, batch_size=2, num_workers=1)
    with pytest.raises(ImageListError) as err:
        next(iter(loader))
    assert str(err.value).startswith("x.txt:2: image ") and "Traceback" not in str(err.value)


def test_list_source_gives_images_their_list_file_and_line(tmp_path):
    lists = write_synthetic_list_dataset(tmp_path, num_labels=4, n=40, query=10, train=10)
    cfg = _custom_cfg(tmp_path)
    source, _ = load_source(cfg.data, seed=0)
    first_train = lists["train"].read_text().split()[0]
    i = source.images.paths.index(first_train)
    assert source.images.origin(i) in (f"{lists['train']}:1", f"{lists['database']}:"
                                       f"{lists['database'].read_text().split(chr(10)).index(lists['train'].read_text().split(chr(10))[0]) + 1}")


def test_cli_train_with_a_corrupt_image_exits_2_or_skips(tmp_path):
    """End to end: a truncated training image (header intact) under the default header check."""
    import subprocess
    import sys

    lists = write_synthetic_list_dataset(tmp_path, num_labels=3, n=200, query=20, train=90, multilabel=False)
    bad = lists["train"].read_text().split()[0]
    _corrupt_png(tmp_path / bad)
    args = [sys.executable, "-m", "dsrh_lightning.cli", "train", "dataset=custom", f"data.root={tmp_path}",
            "data.train_list=train.txt", "data.query_list=test.txt", "data.database_list=database.txt",
            "model.backbone=small_cnn", "model.weights=none", "model.bits=8", "data.batch_size=8",
            "data.eval_batch_size=64", "data.num_workers=1", "data.image_size=32", "data.protocol.val_per_class=1",
            "data.protocol.val_database_size=0", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "logger.name=none", f"output_dir={tmp_path / 'runs'}", "trainer.progress_bar=false", "data.split_dir="]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and f"{lists['train']}:1: image " in proc.stderr
    proc = subprocess.run(args + ["data.on_bad=skip"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{lists['train']}:1: image " in proc.stderr and "in its place" in proc.stderr


def test_paths_spelled_differently_are_one_image(tmp_path):
    """Every path is normalised once (resolved, relative to the root) before repeat and overlap checks."""
    _touch_images(tmp_path, ["c0/2.png", "c1/3.png"])
    (tmp_path / "alias").symlink_to(tmp_path / "c0")
    for spelling in ["./c0/2.png", "c0/../c1/../c0/2.png", "c0//2.png", "alias/2.png", str(tmp_path / "c0/2.png")]:
        f = _write(tmp_path, f"c0/2.png 0\n{spelling} 0\n")
        with pytest.raises(ImageListError, match=r":2: .*repeats line 1 \(both are c0/2.png\)"):
            read_image_list(f, tmp_path)
    assert read_image_list(_write(tmp_path, "./c0/2.png 0\nc1/./3.png 1\n"), tmp_path).paths == ["c0/2.png", "c1/3.png"]
    with pytest.raises(ImageListError, match="escapes the data root"):
        read_image_list(_write(tmp_path, "c0/../../outside.png 0\n"), tmp_path)


def test_a_query_spelled_with_dot_slash_still_overlaps_the_database(tmp_path):
    write_synthetic_list_dataset(tmp_path, num_labels=4, n=40, query=10, train=10)
    extra = (tmp_path / "test.txt").read_text().splitlines()[0]
    with open(tmp_path / "database.txt", "a") as fh:
        fh.write("./" + extra + "\n")
    cfg = _custom_cfg(tmp_path)
    source, part = load_source(cfg.data, seed=0)
    with pytest.raises(ValueError, match="1 image\\(s\\) are both queries and database"):
        make_split(source, part, cfg.data)
