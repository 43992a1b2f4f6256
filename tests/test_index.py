"""Codes files, exact search (faiss vs torch vs brute force), and `dsrh index` / `dsrh search` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from conftest import REPO
from dsrh_lightning import cli
from dsrh_lightning.search import CodesFileError as IndexFileError
from dsrh_lightning.search import read_codes, write_codes
from dsrh_lightning.search.engines import faiss_available, search, search_faiss, search_torch

needs_faiss = pytest.mark.skipif(not faiss_available(), reason="faiss not installed")


def brute_topk(q: np.ndarray, db: np.ndarray, k: int):
    """Reference: full distance matrix, then sort by (distance, index) per query."""
    dist = (q[:, None, :] != db[None, :, :]).sum(-1)
    idx = np.stack([np.lexsort((np.arange(len(db)), d))[:k] for d in dist])
    return np.take_along_axis(dist, idx, 1), idx


def clustered_codes(rng, n: int, bits: int, centres: int, flips: int) -> np.ndarray:
    c = rng.integers(0, 2, (centres, bits), dtype=np.uint8)
    x = c[rng.integers(0, centres, n)].copy()
    for row in x:
        row[rng.choice(bits, rng.integers(0, flips + 1), replace=False)] ^= 1
    return x


@pytest.mark.parametrize("bits,nd,k", [(6, 500, 7), (12, 2000, 50), (12, 300, 300), (12, 40, 100), (20, 1500, 1)])
def test_engines_equal_brute_force_with_many_ties(bits, nd, k):
    rng = np.random.default_rng(bits * 1000 + nd)
    db = clustered_codes(rng, nd, bits, centres=5, flips=2)  # heavy ties at every distance
    q = np.concatenate([db[:3], clustered_codes(rng, 80, bits, centres=5, flips=3)])  # > 64: grouped range calls
    ref_d, ref_i = brute_topk(q, db, min(k, nd))
    d, i = search_torch(q, db, k, db_chunk=97)  # several chunks: exercises the merge
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(d, ref_d)
    if faiss_available():
        d, i = search_faiss(q, np.packbits(db, axis=1), bits, k, multihash=False)
        np.testing.assert_array_equal(i, ref_i)
        np.testing.assert_array_equal(d, ref_d)


@needs_faiss
def test_faiss_multihash_is_exact_and_falls_back():
    rng = np.random.default_rng(3)
    bits, nd, k = 48, 4000, 20
    db = clustered_codes(rng, nd, bits, centres=40, flips=3)
    near = db[rng.integers(0, nd, 12)]  # queries inside clusters: k-th distance small -> multi-hash answers
    far = rng.integers(0, 2, (8, bits), dtype=np.uint8)  # random queries: k-th distance large -> flat fallback
    q = np.concatenate([near, far])
    ref_d, ref_i = brute_topk(q, db, k)
    stats: dict = {}
    d, i = search_faiss(q, np.packbits(db, axis=1), bits, k, multihash=True, nhash=3, nflip=1, stats=stats)
    np.testing.assert_array_equal(i, ref_i)
    np.testing.assert_array_equal(d, ref_d)
    assert stats["multihash_queries"] >= 10 and stats["flat_queries"] >= 1, stats


@pytest.mark.parametrize("bits", [12, 48])
def test_codes_file_round_trip(tmp_path, bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2, (33, bits), dtype=np.uint8)
    labels = rng.integers(0, 2, (33, 5))
    ids = [f"img/{i:03d}.png" for i in range(33)]
    path = tmp_path / "codes.npz"
    write_codes(path, codes, ids, labels, checkpoint="/x/run.ckpt", weights_hash="abc123", source="test")
    ix = read_codes(path)
    assert ix.bits == bits and len(ix) == 33 and ix.packed.shape == (33, (bits + 7) // 8)
    np.testing.assert_array_equal(ix.unpacked(), codes)
    np.testing.assert_array_equal(ix.labels, labels)
    # relative image paths are relative to the codes file, resolved on read
    assert list(ix.ids) == [str((tmp_path / i).resolve()) for i in ids]
    assert ix.checkpoint == "/x/run.ckpt" and ix.weights_hash == "abc123"
    write_codes(path, codes, ids)  # labels are optional
    assert read_codes(path).labels is None
    d, i, _ = search(codes[:4], ix, k=3, engine="torch")
    ref_d, ref_i = brute_topk(codes[:4], codes, 3)
    np.testing.assert_array_equal(i, ref_i)


def test_codes_file_errors_name_the_file(tmp_path):
    good = tmp_path / "good.npz"
    write_codes(good, np.zeros((2, 8), np.uint8), ["a", "b"])
    with np.load(good) as z:
        arrays = {k: z[k] for k in z.files}
    cases = {
        "missing.npz": None,
        "text.npz": "not a zip",
        "foreign.npz": {"features": np.zeros((2, 8)), "labels": np.zeros(2)},
        "newer.npz": {**arrays, "version": np.asarray(2)},
        "nopacked.npz": {k: v for k, v in arrays.items() if k != "packed"},
        "badbits.npz": {**arrays, "bits": np.asarray(20)},
        "emptyindex.npz": {**arrays, "packed": np.zeros((0, 1), np.uint8), "ids": np.asarray([], dtype=str)},
        "strlabels.npz": {**arrays, "labels": np.asarray(["cat", "dog"])},
        "hugelabels.npz": {**arrays, "labels": np.asarray([1e20, 0.0])},
        "empty.npz": "",
        "array.npy": np.zeros((2, 8), np.uint8),
        "truncated.npz": good.read_bytes()[:40],
    }
    expect = {"missing.npz": "not found", "text.npz": "cannot read", "foreign.npz": "unknown format",
              "newer.npz": "version 2", "nopacked.npz": "missing key", "badbits.npz": "does not hold 20 bits",
              "emptyindex.npz": "index is empty", "strlabels.npz": "class ids", "hugelabels.npz": "1e+20",
              "empty.npz": "empty", "array.npy": "not an .npz", "truncated.npz": "cannot read"}
    for name, content in cases.items():
        p = tmp_path / name
        if isinstance(content, bytes):
            p.write_bytes(content)
        elif name.endswith(".npy"):
            np.save(p, content)
        elif isinstance(content, str):
            p.write_text(content)
        elif content is not None:
            np.savez(p, **content)
        with pytest.raises(IndexFileError) as err:
            read_codes(p)
        assert str(p) in str(err.value) and expect[name] in str(err.value), (name, str(err.value))


# ---------------------------------------------------------------------------------------- end to end


def _run_main(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_index_split_folder_and_search(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    from dsrh_lightning.data.datamodule import load_source, make_split
    from dsrh_lightning.runs.checkpoints import load_run
    from dsrh_lightning.search.encode import encode, split_dataset

    ckpt, cfg = tiny_ckpt
    db_file = tmp_path / "db.npz"
    rc, _, err = _run_main(["index", "--ckpt", str(ckpt), "--out", str(db_file), "split=database", "--no-progress"],
                           capsys)
    assert rc == 0, err
    ix = read_codes(db_file)
    source, part = load_source(cfg.data, cfg.seed)
    split = make_split(source, part, cfg.data)
    assert len(ix) == len(split.database) and ix.bits == cfg.model.bits
    np.testing.assert_array_equal(ix.labels, source.labels[split.database])
    assert list(ix.ids[:2]) == [f"synthetic#{j}" for j in split.database[:2]]
    assert ix.checkpoint == str(ckpt.resolve()) and len(ix.weights_hash) == 16
    # Reference codes: the network applied directly, thresholded at eval.threshold.
    run = load_run(ckpt)
    module, cfg2 = run.module, run.cfg
    ds, _, _ = split_dataset(cfg2, "database")
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        ref = (module(x) > cfg.eval.threshold).to(torch.uint8).numpy()
    np.testing.assert_array_equal(ix.unpacked(), ref)
    np.testing.assert_array_equal(encode(module, ds, cfg.eval.threshold, 50, progress=False), ref)

    # The same database images as PNG files (lossless) in nested folders give the same codes.
    folder = tmp_path / "images"
    picks = [0, 5, 17, 40, 41, len(split.database) - 1]
    for n, p in enumerate(picks):
        sub = folder / ("a" if n % 2 else "b/c")
        sub.mkdir(parents=True, exist_ok=True)
        Image.fromarray(source.images[split.database[p]]).save(sub / f"db{p:04d}.png")
    (folder / "notes.txt").write_text("not an image")
    folder_file = tmp_path / "folder.npz"
    rc, _, err = _run_main(["index", "--ckpt", str(ckpt), "--out", str(folder_file), str(folder), "--no-progress"],
                           capsys)
    assert rc == 0, err
    fx = read_codes(folder_file)
    assert len(fx) == len(picks) and fx.labels is None
    by_name = {Path(i).name: n for n, i in enumerate(fx.ids)}
    for p in picks:
        np.testing.assert_array_equal(fx.unpacked()[by_name[f"db{p:04d}.png"]], ref[p])

    # Search: results equal brute force over the index codes, for both engines and through a real subprocess.
    queries = [str(folder / "b/c" / "db0000.png"), str(folder / "a" / "db0005.png")]
    q_codes = np.stack([ref[0], ref[5]])
    k = 25
    ref_d, ref_i = brute_topk(q_codes, ref, k)
    outs = {}
    for engine in (["torch", "faiss"] if faiss_available() else ["torch"]):
        rc, out, err = _run_main(["search", "--index", str(db_file), "--ckpt", str(ckpt), *queries, "--k", str(k),
                                  "--json", "--engine", engine], capsys)
        assert rc == 0, err
        outs[engine] = json.loads(out)
        assert outs[engine]["engine"] == engine
        for r, res in enumerate(outs[engine]["queries"]):
            assert res["query"] == queries[r]
            assert [x["index"] for x in res["results"]] == ref_i[r].tolist()
            assert [x["distance"] for x in res["results"]] == ref_d[r].tolist()
            assert [x["id"] for x in res["results"]] == [f"synthetic#{split.database[j]}" for j in ref_i[r]]
    assert outs["torch"]["queries"] == outs.get("faiss", outs["torch"])["queries"]
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "search", "--index", str(db_file),
                           "--ckpt", str(ckpt), queries[0], "--k", "3"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"query: {queries[0]}"
    assert lines[1].split() == ["rank", "ties", "hamming", "label", "path"]  # the database split keeps its labels
    rows = [ln.split() for ln in lines[2:5]]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert [int(r[2]) for r in rows] == ref_d[0][:3].tolist()
    assert [int(r[3]) for r in rows] == source.labels[split.database[ref_i[0][:3]]].tolist()
    assert [r[4] for r in rows] == [f"synthetic#{split.database[j]}" for j in ref_i[0][:3]]

    # Image ids are absolute paths: a search run from another folder names files that exist.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel_index = Path("..") / "rel.npz"
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "index", "--ckpt", str(ckpt), "--out",
                           str(rel_index), "../images", "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=120, cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr[-2000:]
    other = tmp_path / "other"
    other.mkdir()
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "search", "--index", str(tmp_path / "rel.npz"),
                           "--ckpt", str(ckpt), str(folder / "a" / "db0005.png"), "--k", "2", "--json"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=other)
    assert proc.returncode == 0, proc.stderr[-2000:]
    hits = json.loads(proc.stdout)["queries"][0]["results"]
    assert hits[0]["distance"] == 0 and Path(hits[0]["id"]).is_absolute() and Path(hits[0]["id"]).is_file()
    assert Path(hits[0]["id"]).read_bytes() == (folder / "a" / "db0005.png").read_bytes() or \
        np.array_equal(fx.unpacked()[by_name[Path(hits[0]["id"]).name]], ref[5])


def test_search_and_index_errors_exit_2(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    ckpt, cfg = tiny_ckpt
    img = tmp_path / "ok.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(img)
    wrong_bits = tmp_path / "wrong.npz"
    write_codes(wrong_bits, np.zeros((4, cfg.model.bits + 4), np.uint8), list("abcd"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    good = tmp_path / "good.npz"
    write_codes(good, np.zeros((4, cfg.model.bits), np.uint8), list("abcd"))
    npy = tmp_path / "codes.npy"
    np.save(npy, np.zeros((4, cfg.model.bits), np.uint8))
    empty_index = tmp_path / "empty_index.npz"
    with np.load(good) as z:
        np.savez(empty_index, **{**{k: z[k] for k in z.files}, "packed": np.zeros((0, z["packed"].shape[1]), np.uint8),
                                 "ids": np.asarray([], dtype=str)})
    cases = [
        (["search", "--index", str(npy), "--ckpt", str(ckpt), str(img)], [str(npy), "not an .npz"]),
        (["search", "--index", str(empty_index), "--ckpt", str(ckpt), str(img)], [str(empty_index), "empty"]),
        (["search", "--index", str(good), "--ckpt", str(ckpt), str(img), "--k", "-5"], ["--k", "-5"]),
        (["index", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), str(img), "--batch-size", "-1"],
         ["--batch-size"]),
        (["search", "--index", str(wrong_bits), "--ckpt", str(ckpt), str(img)], [str(wrong_bits), "bits"]),
        (["search", "--index", str(good), "--ckpt", str(ckpt), str(broken)], [str(broken), "cannot read image"]),
        (["search", "--index", str(good), "--ckpt", str(ckpt), str(empty)], [str(empty), "no images"]),
        (["search", "--index", str(img), "--ckpt", str(ckpt), str(img)], [str(img)]),
        (["index", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), str(empty)], ["no images"]),
        (["index", "--ckpt", str(ckpt), "--out", str(tmp_path / "x.npz"), "split=validation"], ["split=validation"]),
    ]
    for argv, needles in cases:
        rc, _, err = _run_main(argv, capsys)
        assert rc == 2, (argv, err)
        assert "Traceback" not in err
        for needle in needles:
            assert needle in err, (argv, err)
    # The weights hash tells when the index came from other weights.
    rc, _, err = _run_main(["search", "--index", str(good), "--ckpt", str(ckpt), str(img), "--k", "2"], capsys)
    assert rc == 0 and "other weights" not in err
    write_codes(good, np.zeros((4, cfg.model.bits), np.uint8), list("abcd"), weights_hash="0" * 16)
    rc, _, err = _run_main(["search", "--index", str(good), "--ckpt", str(ckpt), str(img), "--k", "2"], capsys)
    assert rc == 0 and "other weights" in err
