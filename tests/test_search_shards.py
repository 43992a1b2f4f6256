"""Sharded indexes: the folder format, its checks, and reading it whole or a shard at a time."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsrh_lightning.search import (CodesFileError, open_codes, open_sharded, read_codes, read_index, write_codes,
                                   write_manifest, write_shard, write_sharded)
from dsrh_lightning.search.shards import MANIFEST, ShardedCodes, shard_name


def _codes(n=25, bits=12, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 2, (n, bits), dtype=np.uint8), rng.integers(0, 2, (n, 4))


def test_round_trip_whole_and_by_shard(tmp_path):
    codes, labels = _codes()
    ids = [f"img/{i:03d}.png" for i in range(25)]
    ix = write_sharded(tmp_path / "ix", codes, ids, labels, shard_size=10, checkpoint="/c.ckpt", weights_hash="w1",
                       source="test")
    assert isinstance(ix, ShardedCodes) and len(ix) == 25 and ix.bits == 12
    assert [(s.path.name, s.count, s.offset) for s in ix.shards] == [
        ("shard-00000.npz", 10, 0), ("shard-00001.npz", 10, 10), ("shard-00002.npz", 5, 20)]
    assert sorted(p.name for p in (tmp_path / "ix").iterdir()) == [MANIFEST] + [shard_name(i) for i in range(3)]
    # each shard is a normal codes file
    np.testing.assert_array_equal(read_codes(tmp_path / "ix" / "shard-00001.npz").unpacked(), codes[10:20])
    # whole
    whole = read_index(tmp_path / "ix")
    np.testing.assert_array_equal(whole.unpacked(), codes)
    np.testing.assert_array_equal(whole.labels, labels)
    assert list(whole.ids) == [str((tmp_path / "ix" / i).resolve()) for i in ids]
    assert (whole.checkpoint, whole.weights_hash, whole.source) == ("/c.ckpt", "w1", "test")
    assert len(read_index(tmp_path / "ix" / MANIFEST)) == 25  # the manifest names the index too
    # a shard at a time
    blocks = list(ix.blocks())
    assert [o for o, _ in blocks] == [0, 10, 20]
    np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), np.packbits(codes, axis=1))
    # ids and labels of chosen items, any shape, from the shards that hold them
    pick = np.asarray([[24, 0, 10], [9, 20, 19]])
    got_ids, got_labels = ix.take(pick)
    assert got_ids.shape == (2, 3) and got_ids.tolist() == np.asarray(whole.ids)[pick].tolist()
    np.testing.assert_array_equal(got_labels, labels[pick])
    with pytest.raises(IndexError):
        ix.take([25])
    np.testing.assert_array_equal(ix.packed_at([24, 3]), np.packbits(codes[[24, 3]], axis=1))
    # finding items by id (absolute paths, as dsrh search spells a query file), first occurrence
    wanted = [str((tmp_path / "ix" / ids[j]).resolve()) for j in (13, 2)] + ["/not/there.png"]
    assert ix.find(wanted) == {wanted[0]: 13, wanted[1]: 2}
    assert whole.find(wanted) == {wanted[0]: 13, wanted[1]: 2}
    np.testing.assert_array_equal(whole.packed_at([24, 3]), ix.packed_at([24, 3]))
    # open_codes: a folder opens lazily, a file is read
    assert isinstance(open_codes(tmp_path / "ix"), ShardedCodes)
    write_codes(tmp_path / "one.npz", codes, ids)
    assert len(open_codes(tmp_path / "one.npz")) == 25


def test_rewrite_with_fewer_shards_leaves_no_stale_shard(tmp_path):
    codes, _ = _codes(30)
    write_sharded(tmp_path / "ix", codes, [str(i) for i in range(30)], shard_size=7)
    ix = write_sharded(tmp_path / "ix", codes[:12], [str(i) for i in range(12)], shard_size=7)
    assert len(ix) == 12 and len(list((tmp_path / "ix").glob("shard-*.npz"))) == 2
    np.testing.assert_array_equal(read_index(tmp_path / "ix").unpacked(), codes[:12])


def test_writer_pieces_for_resumable_writers(tmp_path):
    codes, labels = _codes(9)
    with pytest.raises(FileNotFoundError, match="shard-00001.npz"):
        write_shard(tmp_path, 0, codes[:5], list("abcde"), labels[:5])
        write_manifest(tmp_path, [5, 4], 12)  # shard 1 not written yet
    write_shard(tmp_path, 1, codes[5:], list("fghi"), labels[5:])
    write_manifest(tmp_path, [5, 4], 12, checkpoint="c", weights_hash="", source="s")
    np.testing.assert_array_equal(read_index(tmp_path).unpacked(), codes)


@pytest.fixture
def index_dir(tmp_path):
    codes, labels = _codes(25)
    write_sharded(tmp_path / "ix", codes, [str(i) for i in range(25)], labels, shard_size=10, weights_hash="w1")
    return tmp_path / "ix"


def _edit_manifest(folder, **changes):
    m = json.loads((folder / MANIFEST).read_text())
    m.update(changes)
    (folder / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("change,message", [
    ({"format": "other"}, "not a dsrh-codes-sharded manifest"),
    ({"version": 2}, "version 2 is not supported"),
    ({"bits": 12.5}, "'bits' must be a positive integer"),
    ({"count": 26}, "'count' is 26 but the shards hold 25"),
    ({"shards": []}, "non-empty list"),
    ({"shards": [{"file": "../x/shard-00000.npz", "count": 25}]}, "a file name in the index folder"),
    ({"shards": [{"file": "/etc/passwd", "count": 25}]}, "a file name in the index folder"),
    ({"shards": [{"file": "shard-00000.npz", "count": 0}]}, "'count' must be a positive integer"),
    ({"shards": [{"file": "shard-00000.npz", "count": 10}, {"file": "shard-00000.npz", "count": 15}]},
     "listed twice"),
])
def test_bad_manifests_are_named(index_dir, change, message):
    _edit_manifest(index_dir, **change)
    with pytest.raises(CodesFileError) as err:
        open_sharded(index_dir)
    assert str(index_dir / MANIFEST) in str(err.value) and message in str(err.value), str(err.value)


def test_shards_that_disagree_with_the_manifest_are_named(index_dir, tmp_path):
    codes, labels = _codes(10, bits=12, seed=5)
    cases = [
        (lambda: _edit_manifest(index_dir, bits=11), "shard-00000.npz", "has 12-bit codes but"),
        (lambda: write_codes(index_dir / "shard-00001.npz", codes[:9], list("abcdefghi"), labels[:9],
                             weights_hash="w1"), "shard-00001.npz", "has 9 codes but"),
        (lambda: write_codes(index_dir / "shard-00002.npz", codes[:5], list("abcde"), labels[:5],
                             weights_hash="other"), "shard-00002.npz", "all shards must come from one checkpoint"),
        (lambda: (index_dir / "shard-00001.npz").unlink(), "shard-00001.npz", "index folder is incomplete"),
        (lambda: (index_dir / "shard-00001.npz").write_text("junk"), "shard-00001.npz", "cannot read"),
    ]
    for break_it, name, message in cases:
        write_sharded(index_dir, *_codes(25)[:1], [str(i) for i in range(25)], _codes(25)[1], shard_size=10,
                      weights_hash="w1")
        break_it()
        with pytest.raises(CodesFileError) as err:
            list(open_sharded(index_dir).blocks())
        assert name in str(err.value) and message in str(err.value), str(err.value)
        with pytest.raises(CodesFileError, match=message.split()[0]):
            read_index(index_dir)


def test_shards_must_agree_on_labels(index_dir):
    codes, _ = _codes(10)
    write_codes(index_dir / "shard-00001.npz", codes, [str(i) for i in range(10)], weights_hash="w1")
    with pytest.raises(CodesFileError, match="some have labels, some do not"):
        read_index(index_dir)
    with pytest.raises(CodesFileError, match="some have labels, some do not"):
        open_sharded(index_dir).take([0, 12])


def test_unfinished_and_missing_folders_say_what_to_do(tmp_path, index_dir):
    (index_dir / MANIFEST).unlink()
    with pytest.raises(CodesFileError, match="unfinished .*run the same `dsrh index` command again"):
        open_codes(index_dir)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CodesFileError, match="no manifest.json; expected a sharded index folder"):
        open_codes(tmp_path / "empty")
    with pytest.raises(CodesFileError, match="folder not found"):
        open_sharded(tmp_path / "nope")
    with pytest.raises(CodesFileError, match="is a sharded index"):
        read_codes(index_dir)


def test_eval_codes_reads_a_sharded_database_like_the_codes_file(tmp_path, capsys):
    import json as _json

    from dsrh_lightning import cli

    rng = np.random.default_rng(5)
    db = rng.integers(0, 2, (120, 16), dtype=np.uint8)
    labels = rng.integers(0, 4, 120)
    q = rng.integers(0, 2, (15, 16), dtype=np.uint8)
    np.savez(tmp_path / "q.npz", codes=q, labels=rng.integers(0, 4, 15))
    write_codes(tmp_path / "db.npz", db, [f"x#{i}" for i in range(120)], labels)
    write_sharded(tmp_path / "dbs", db, [f"x#{i}" for i in range(120)], labels, shard_size=50)
    results = []
    for database in ("db.npz", "dbs"):
        assert cli.main(["eval-codes", "--query", str(tmp_path / "q.npz"), "--database", str(tmp_path / database),
                         "--json"]) == 0
        results.append(_json.loads(capsys.readouterr().out))
    assert results[0] == results[1] and 0 < results[0]["map"] <= 1
