"""eval-codes CLI: JSON output and clear exit-code-2 errors for bad files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dsrh_lightning import cli
from dsrh_lightning.cli.parsers import add_eval_codes_args
from dsrh_lightning.runs import eval_codes
from dsrh_lightning.metrics import retrieval_metrics


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    q = tmp_path / "q.npz"
    d = tmp_path / "d.npz"
    qc, dc = rng.integers(0, 2, (8, 16)), rng.integers(0, 2, (60, 16)) * 2 - 1
    ql, dl = (rng.random((8, 5)) < 0.4).astype(int), (rng.random((60, 5)) < 0.4).astype(int)
    np.savez(q, codes=qc, labels=ql)
    np.savez(d, codes=dc, labels=dl)
    return tmp_path, q, d, (qc, dc, ql, dl)


def test_json_output_matches_function(files, capsys):
    _, q, d, case = files
    rc = cli.main(["eval-codes", "--query", str(q), "--database", str(d), "--topk", "20", "--ndcg-k", "10",
                          "--acg-k", "10", "--wmap-topk", "20", "--precision-at", "5", "10", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    ref = retrieval_metrics(*case, topk=20, ndcg_k=10, acg_k=10, wmap_topk=20, precision_at=(5, 10))
    for key in ("map", "precision_radius", "ndcg", "acg", "wmap", "precision@5", "recall@10"):
        assert out[key] == pytest.approx(ref[key])
    assert (out["num_queries"], out["num_database"], out["bits"]) == (8, 60, 16)


def test_table_output(files, capsys):
    _, q, d, _ = files
    assert cli.main(["eval-codes", "--query", str(q), "--database", str(d)]) == 0
    assert "map" in capsys.readouterr().out


def _err(capsys, argv):
    rc = cli.main(["eval-codes", *argv])
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.err
    return captured.err


def test_bad_files(files, capsys):
    tmp, q, d, (qc, dc, ql, dl) = files
    missing = tmp / "nope.npz"
    assert str(missing) in _err(capsys, ["--query", str(missing), "--database", str(d)])
    txt = tmp / "text.npz"
    txt.write_text("not an archive")
    msg = _err(capsys, ["--query", str(txt), "--database", str(d)])
    assert str(txt) in msg and "npz" in msg
    nokey = tmp / "nokey.npz"
    np.savez(nokey, bits=qc)
    msg = _err(capsys, ["--query", str(q), "--database", str(nokey)])
    assert str(nokey) in msg and "'bits'" in msg and "codes" in msg
    width = tmp / "width.npz"
    np.savez(width, codes=dc[:, :8], labels=dl)
    msg = _err(capsys, ["--query", str(q), "--database", str(width)])
    assert str(width) in msg and "bits" in msg
    lw = tmp / "labelwidth.npz"
    np.savez(lw, codes=dc, labels=np.concatenate([dl, dl], 1))
    assert str(lw) in _err(capsys, ["--query", str(q), "--database", str(lw)])
    cnt = tmp / "count.npz"
    np.savez(cnt, codes=dc, labels=dl[:10])
    msg = _err(capsys, ["--query", str(q), "--database", str(cnt)])
    assert str(cnt) in msg and "rows" in msg
    vals = tmp / "values.npz"
    np.savez(vals, codes=np.where(dc > 0, 1, 0) - (np.arange(60)[:, None] == 0), labels=dl)
    msg = _err(capsys, ["--query", str(q), "--database", str(vals)])
    assert str(vals) in msg and "-1" in msg


def test_build_parser_and_run_for_subcommand(files, capsys):
    import argparse

    _, q, d, _ = files
    parser = argparse.ArgumentParser(prog="dsrh")
    sub = parser.add_subparsers(dest="cmd").add_parser("eval-codes")
    add_eval_codes_args(sub)
    args = parser.parse_args(["eval-codes", "--query", str(q), "--database", str(d), "--json"])
    assert eval_codes.run(args) == 0
    assert "map" in json.loads(capsys.readouterr().out)


def test_bad_labels_and_inputs(files, capsys):
    tmp, q, d, (qc, dc, ql, dl) = files
    cases = {
        "strlabels.npz": dict(codes=dc, labels=np.asarray([f"c{i % 3}" for i in range(60)])),
        "hugelabels.npz": dict(codes=dc, labels=np.where(np.arange(60) == 3, 1e20, 1.0)),
        "fraclabels.npz": dict(codes=dc, labels=np.full(60, 0.5)),
        "emptycodes.npz": dict(codes=np.zeros((0, 16)), labels=np.zeros(0, int)),
    }
    needles = {"strlabels.npz": "class ids", "hugelabels.npz": "1e+20", "fraclabels.npz": "integer class ids",
               "emptycodes.npz": "empty"}
    for name, arrays in cases.items():
        np.savez(tmp / name, **arrays)
        msg = _err(capsys, ["--query", str(q), "--database", str(tmp / name)])
        assert str(tmp / name) in msg and needles[name] in msg, (name, msg)
    npy = tmp / "codes.npy"
    np.save(npy, dc)
    msg = _err(capsys, ["--query", str(q), "--database", str(npy)])
    assert str(npy) in msg and "not an .npz" in msg and "np.savez" in msg
    empty = tmp / "empty.npz"
    empty.write_bytes(b"")
    msg = _err(capsys, ["--query", str(empty), "--database", str(d)])
    assert str(empty) in msg and "empty" in msg


def test_topk_negative_and_zero(files, capsys):
    _, q, d, case = files
    msg = _err(capsys, ["--query", str(q), "--database", str(d), "--topk", "-5"])
    assert "--topk" in msg and "-5" in msg and "use 0" in msg
    assert cli.main(["eval-codes", "--query", str(q), "--database", str(d), "--topk", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["map"] == pytest.approx(retrieval_metrics(*case)["map"])  # 0 = whole database


def test_reads_dsrh_index_files_and_cli(files, capsys):
    """The one reader: a `dsrh index` codes file with labels evaluates like the plain file it holds."""
    from dsrh_lightning import cli
    from dsrh_lightning.search import write_codes

    tmp, q, d, (qc, dc, ql, dl) = files
    idx = tmp / "db_index.npz"
    write_codes(idx, (dc > 0).astype(np.uint8), [f"x#{i}" for i in range(len(dc))], dl)
    rc = cli.main(["eval-codes", "--query", str(q), "--database", str(idx), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["map"] == pytest.approx(retrieval_metrics(qc, dc, ql, dl)["map"])
    nolab = tmp / "nolabels.npz"
    write_codes(nolab, (dc > 0).astype(np.uint8), [f"x#{i}" for i in range(len(dc))])
    msg = _err(capsys, ["--query", str(q), "--database", str(nolab)])
    assert str(nolab) in msg and "no labels" in msg


def test_cutoff_flags_come_from_the_metric_specs(files, capsys):
    import argparse

    from dsrh_lightning.metrics.specs import metric_options

    parser = add_eval_codes_args(argparse.ArgumentParser(prog="eval-codes"))
    flags = {a.dest: a for a in parser._actions}
    for name, spec in metric_options().items():
        assert name in flags, name
        assert flags[name].default == (list(spec.default) if spec.kind == "cutoffs" else spec.default)
    msg = _err(capsys, ["--query", str(files[1]), "--database", str(files[2]), "--ndcg-k", "-1"])
    assert "--ndcg-k" in msg and "leave the metric out" in msg
