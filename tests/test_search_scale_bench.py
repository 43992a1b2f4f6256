"""benchmarks/search_scale runs at a tiny size, and its agreement checks catch a wrong result."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks import search_scale
from dsrh_lightning.search.engines import faiss_available, search_numba

pytestmark = pytest.mark.skipif(not faiss_available(), reason="the benchmark compares with faiss")


def test_tiny_run_prints_one_row_per_case(capsys, tmp_path):
    out_json = tmp_path / "rows.json"
    rc = search_scale.main(["--sizes", "3000", "--bits", "20", "64", "--single", "3", "--batch", "40",
                            "--repeat", "1", "--threads", "2", "--json", str(out_json)])
    assert rc == 0
    table = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| 3,000 |")]
    assert [ln.split("|")[2:4] for ln in table] == [[" 20 ", " single (3) "], [" 20 ", " batch (40) "],
                                                   [" 64 ", " single (3) "], [" 64 ", " batch (40) "]]
    import json

    rows = json.loads(out_json.read_text())["rows"]
    assert all(r["ours_qps"] > 0 and r["faiss_qps"] > 0 and r["scan_s"] > 0 for r in rows)
    assert [r["db_bytes"] for r in rows] == [3000 * 3, 3000 * 3, 3000 * 8, 3000 * 8]


def test_random_codes_have_zero_padding():
    packed = search_scale.random_packed(np.random.default_rng(0), 500, 12)
    assert packed.shape == (500, 2) and not (packed[:, 1] & 0x0F).any() and (packed[:, 1] & 0xF0).any()


def test_checks_refuse_a_wrong_tie_order_and_wrong_distances():
    import faiss

    rng = np.random.default_rng(1)
    db = search_scale.random_packed(rng, 400, 8)  # 8 bits, 400 codes: every distance is a large tie group
    q = rng.integers(0, 2, (5, 8), dtype=np.uint8)
    index = faiss.IndexBinaryFlat(8)
    index.add(db)
    ours = search_numba(q, db, 7)
    theirs = index.search(np.packbits(q, axis=1), 7)
    search_scale.check(q, db, 7, ours, theirs, 5, "ok")  # the right answer passes
    d, i = ours
    ref_d, ref_i = search_scale.reference(np.packbits(q, axis=1)[0], db, 7)
    np.testing.assert_array_equal(ref_i, i[0])
    swapped = i.copy()
    last = np.flatnonzero(d[0] == d[0, -1])
    swapped[0, last[-1]] = np.flatnonzero(np.unpackbits(db, axis=1, count=8).__ne__(q[0]).sum(1) == d[0, -1])[-1]
    assert not np.array_equal(swapped, i)  # another item of the same tie group: the index order is broken
    with pytest.raises(AssertionError, match="not the exact"):
        search_scale.check(q, db, 7, (d, swapped), theirs, 5, "swapped")
    wrong = d.copy()
    wrong[2, 0] += 1
    with pytest.raises(AssertionError, match="distances differ"):
        search_scale.check(q, db, 7, (wrong, i), theirs, 5, "wrong")
