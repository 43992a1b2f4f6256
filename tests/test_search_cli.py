"""`dsrh search` output: tie groups, the query marked, in-memory ids with a way to see them, sharded
indexes searched like a codes file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from dsrh_lightning import cli
from dsrh_lightning.cli.search_command import tie_ranks
from dsrh_lightning.search import read_codes, write_sharded
from dsrh_lightning.search.engines import distance_counts


def _main(argv, capsys):
    rc = cli.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_tie_ranks_and_distance_counts_match_a_loop(monkeypatch):
    from dsrh_lightning.search import CodesIndex
    from dsrh_lightning.search import engines

    rng = np.random.default_rng(0)
    db = rng.integers(0, 2, (300, 10), dtype=np.uint8)
    db[:40] = db[0]  # a big tie group
    q = np.concatenate([db[:1], rng.integers(0, 2, (4, 10), dtype=np.uint8)])
    index = CodesIndex(np.packbits(db, axis=1), 10, np.asarray([str(i) for i in range(300)]))
    ref = np.zeros((len(q), 11), dtype=np.int64)
    for r, row in enumerate(q):
        for x in db:
            ref[r, int((row != x).sum())] += 1
    np.testing.assert_array_equal(distance_counts(q, index), ref)
    d, i, _, counts = engines.search_with_ties(q, index, 5)  # the same counts from the search's own pass
    np.testing.assert_array_equal(counts, ref)
    monkeypatch.setattr(engines, "HAVE_NUMBA", False)  # the numpy fallback
    np.testing.assert_array_equal(distance_counts(q, index), ref)
    np.testing.assert_array_equal(engines._block_counts(np.packbits(q, axis=1), index, index.packed, 10, chunk=37),
                                  ref)  # several chunks
    # ranks by (distance, index): the items at distance d occupy ranks first..last
    order = sorted(range(300), key=lambda j: (int((q[0] != db[j]).sum()), j))
    dists = [int((q[0] != db[j]).sum()) for j in order]
    for d in set(dists):
        pos = [n + 1 for n, x in enumerate(dists) if x == d]
        assert tie_ranks(ref[0], d) == (pos[0], pos[-1])
    assert tie_ranks(ref[0], 0) == (1, 40)


@pytest.fixture(scope="module")
def indexed(tiny_ckpt, tmp_path_factory):
    """A split index, the same as a sharded folder, and an image-folder index with duplicate pictures."""
    from PIL import Image

    from dsrh_lightning.data.datamodule import load_source, make_split

    ckpt, cfg = tiny_ckpt
    tmp = tmp_path_factory.mktemp("search_cli")
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(tmp / "db.npz"), "split=database",
                     "--no-progress"]) == 0
    ix = read_codes(tmp / "db.npz")
    write_sharded(tmp / "sharded", ix.unpacked(), list(ix.ids), ix.labels, shard_size=7, checkpoint=ix.checkpoint,
                  weights_hash=ix.weights_hash, source=ix.source)
    source, part = load_source(cfg.data, cfg.seed)
    split = make_split(source, part, cfg.data)
    pics = tmp / "pics"
    pics.mkdir()
    img = source.images[split.database[3]]
    for n in range(4):  # four copies of one picture: one tie group at distance 0
        Image.fromarray(img).save(pics / f"dup{n}.png")
    for n in range(6):
        Image.fromarray(source.images[split.database[10 + n]]).save(pics / f"other{n}.png")
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(tmp / "pics.npz"), str(pics), "--no-progress"]) == 0
    query = tmp / "query.png"
    Image.fromarray(img).save(query)
    return ckpt, tmp, pics, query


def test_sharded_index_gives_the_same_results_as_the_codes_file(indexed, capsys):
    ckpt, tmp, pics, query = indexed
    outs = {}
    for name in ("db.npz", "sharded"):
        for engine in ("numba", "torch"):
            rc, out, err = _main(["search", "--index", str(tmp / name), "--ckpt", str(ckpt), str(query),
                                  str(pics / "other2.png"), "--k", "12", "--json", "--engine", engine], capsys)
            assert rc == 0, err
            res = json.loads(out)
            assert res["engine"] == engine
            outs[name, engine] = res["queries"]
    assert len({json.dumps(v) for v in outs.values()}) == 1
    # ties are consistent with the distances shown: a row's group contains its rank, groups follow each other
    codes = read_codes(tmp / "db.npz").unpacked()
    for q in outs["db.npz", "numba"]:
        for row in q["results"]:
            first, last = row["ties"]
            assert first <= row["rank"] <= last
        d0 = q["results"][0]["distance"]
        assert q["results"][0]["ties"][0] == 1
        qcode = codes[q["results"][0]["index"]] if d0 == 0 else None
        if qcode is not None:  # the group at distance 0 is every database item with the query's code
            assert q["results"][0]["ties"][1] == int((codes == qcode).all(1).sum())


def test_text_output_shows_tie_groups_and_marks_the_query(indexed, capsys):
    ckpt, tmp, pics, query = indexed
    ix = read_codes(tmp / "pics.npz")
    codes = ix.unpacked()
    item = {Path(i).name: n for n, i in enumerate(ix.ids)}
    # the tie group at distance 0: every indexed picture with the duplicates' code (the four copies, and
    # any other picture the tiny model gives the same code), ranked by index
    group = np.flatnonzero((codes == codes[item["dup0.png"]]).all(1))
    assert len(group) >= 4 and all(item[f"dup{n}.png"] in group for n in range(4))
    target = pics / "dup2.png"
    shown = max(6, int(np.flatnonzero(group == item["dup2.png"])[0]) + 1)
    rc, out, err = _main(["search", "--index", str(tmp / "pics.npz"), "--ckpt", str(ckpt), str(target), "--k",
                          str(shown)], capsys)
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"query: {target}"
    assert lines[1].split() == ["rank", "ties", "hamming", "path"]  # an image-folder index has no labels
    rows = [ln.split() for ln in lines[2:2 + shown]]
    assert [r[0] for r in rows] == [str(n) for n in range(1, shown + 1)]
    in_group = min(shown, len(group))
    assert [r[1] for r in rows[:in_group]] == [f"1-{len(group)}"] * in_group
    assert [r[2] for r in rows[:in_group]] == ["0"] * in_group
    assert [r[3] for r in rows[:in_group]] == [str(ix.ids[j]) for j in group[:in_group]]  # ties by index
    for r in rows[in_group:]:  # later groups start where the earlier ones end
        first, last = (int(x) for x in r[1].split("-")) if "-" in r[1] else (int(r[1]),) * 2
        assert first > len(group) and first <= int(r[0]) <= last and int(r[2]) > 0
    marked = [ln for ln in lines if "<- the query itself" in ln]
    assert len(marked) == 1 and marked[0].split()[3] == str(target.resolve())

    # the query is in the index but below the results shown: said so, with its tie group
    last_dup = pics / f"dup{max(range(4), key=lambda n: item[f'dup{n}.png'])}.png"
    rc, out, err = _main(["search", "--index", str(tmp / "pics.npz"), "--ckpt", str(ckpt), str(last_dup),
                          "--k", "2", "--json"], capsys)
    res = json.loads(out)["queries"][0]
    assert [r["is_query"] for r in res["results"]] == [False, False]
    own = res["query_in_index"]
    assert own["distance"] == 0 and own["ties"] == [1, len(group)] and own["shown"] is False
    assert ix.ids[own["index"]] == str(last_dup.resolve())
    rc, out, err = _main(["search", "--index", str(tmp / "pics.npz"), "--ckpt", str(ckpt), str(last_dup),
                          "--k", "2"], capsys)
    assert "(the query itself is item" in out and f"one of ranks 1-{len(group)}, below the 2 shown" in out
    assert (f"{len(group) - 2} more items tie at hamming 0 (ranks 1-{len(group)}); --k {len(group)} shows them all"
            in out)

    # a copy of a picture that is not itself in the index is not marked
    rc, out, err = _main(["search", "--index", str(tmp / "pics.npz"), "--ckpt", str(ckpt), str(query), "--json"],
                         capsys)
    res = json.loads(out)["queries"][0]
    assert res["query_in_index"] is None and not any(r["is_query"] for r in res["results"])
    assert [r["ties"] for r in res["results"][:4]] == [[1, len(group)]] * 4


def test_in_memory_ids_say_how_to_see_the_image(indexed, capsys):
    ckpt, tmp, pics, query = indexed
    for index in ("db.npz", "sharded"):
        rc, out, err = _main(["search", "--index", str(tmp / index), "--ckpt", str(ckpt), str(query), "--k", "3"],
                             capsys)
        assert rc == 0, err
        lines = out.strip().splitlines()
        assert lines[1].split() == ["rank", "ties", "hamming", "label", "path"]
        first_id = lines[2].split()[4]
        assert first_id.startswith("synthetic#")
        assert lines[-1] == (f"ids like {first_id} are images of an in-memory data set, not files; see one with: "
                             f"dsrh show {first_id} --ckpt {ckpt}")


def test_unfinished_sharded_index_is_an_error_not_a_traceback(indexed, capsys, tmp_path):
    ckpt, tmp, pics, query = indexed
    shutil.copytree(tmp / "sharded", tmp_path / "half")
    (tmp_path / "half" / "manifest.json").unlink()
    rc, out, err = _main(["search", "--index", str(tmp_path / "half"), "--ckpt", str(ckpt), str(query)], capsys)
    assert rc == 2 and "unfinished" in err and "Traceback" not in err
