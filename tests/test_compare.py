"""`dsrh baseline` (classical hashing on cached features, written like a deep run) and `dsrh compare`
(one table and overlaid plots from saved results), and the end of `dsrh sweep-local`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from _metric_refs import ref_metrics
from dsrh_lightning import cli


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny deep run on cached features, and ITQ / LSH baselines on the same features (two via --run)."""
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.train import train

    tmp = tmp_path_factory.mktemp("cmp")
    base = ["dataset=synthetic", f"output_dir={tmp / 'runs'}", "data.synthetic_per_class=40",
            "data.protocol.query_per_class=5", "data.protocol.train_per_class=20", "data.protocol.val_per_class=5",
            "data.batch_size=16", "data.eval_batch_size=64", "trainer.progress_bar=false", "trainer.accelerator=cpu",
            "logger.name=none", f"data.split_dir={tmp / 'splits'}", "data.cache_features=true",
            f"data.feature_dir={tmp / 'features'}"]
    deep = train(load_config(base + ["name=deep", "trainer.max_steps=12", "trainer.val_check_interval=6"]))
    run_dir = Path(deep["run_dir"])
    assert cli.main(["baseline", "itq", "--bits", "12", "--run", str(run_dir), "name=itq12"]) == 0
    assert cli.main(["baseline", "itq", "--bits", "8", "--run", str(run_dir), "name=itq8"]) == 0
    assert cli.main(["baseline", "lsh", "--bits", "12", "--seed", "3", *base, "name=lsh12"]) == 0
    return tmp / "runs", deep


def test_baseline_metrics_match_a_reference_on_the_same_features(runs):
    from dsrh_lightning.baselines import ITQ

    out, deep = runs
    res = json.loads((out / "itq12" / "metrics.json").read_text())
    assert res["method"] == "itq" and res["bits"] == 12
    # the deep run's feature cache and split, fitted again here on the training rows
    cache = np.load(res["feature_cache"])
    split = np.load(Path(deep["run_dir"]) / "split.npz")
    pos = {int(j): i for i, j in enumerate(cache["indices"])}
    feats = lambda idx: cache["features"][[pos[int(j)] for j in idx]]  # noqa: E731
    from dsrh_lightning.data.sources import make_synthetic

    labels = make_synthetic(10, 40, 32, seed=0).labels
    model = ITQ(12, seed=0).fit(feats(split["train"]))
    q, db = model.encode(feats(split["query"])), model.encode(feats(split["database"]))
    ref = ref_metrics(q, db, labels[split["query"]], labels[split["database"]], radius=2)
    assert res["test/map"] == pytest.approx(ref["map"], abs=1e-9)
    assert res["test/precision_radius"] == pytest.approx(ref["precision_radius"], abs=1e-9)
    # the same files as a deep run: config (method as experiment), plots and curves
    plots = out / "itq12" / "plots"
    for name in ("pr_curve", "precision_at_k", "precision_radius", "retrieval_grid"):
        assert (plots / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    curves = json.loads((plots / "curves.json").read_text())
    assert (curves["method"], curves["bits"], curves["step"]) == ("itq", 12, None)
    assert "experiment: itq" in (out / "itq12" / "config.yaml").read_text()
    lsh = json.loads((out / "lsh12" / "metrics.json").read_text())
    assert lsh["seed"] == 3 and 0 < lsh["test/map"] < 1


def test_compare_prints_one_table_and_writes_overlaid_plots(runs, capsys, tmp_path):
    out, deep = runs
    dirs = [out / n for n in ("deep", "itq12", "itq8", "lsh12")]
    assert cli.main(["compare", *map(str, dirs), "--out", str(tmp_path / "cmp")]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    assert lines[0].split() == ["run", "dataset", "method", "bits", "seed", "MAP", "P@r<=2", "best", "step"]
    maps = {d.name: json.loads((d / "metrics.json").read_text())["test/map"] for d in dirs}
    body = lines[2:6]
    assert [ln.split()[0] for ln in body] == sorted(maps, key=lambda n: -maps[n])  # best MAP first
    for ln in body:
        cells = ln.split()
        assert float(cells[5]) == pytest.approx(maps[cells[0]], abs=5e-5)
    deep_row = next(ln.split() for ln in body if ln.startswith("deep"))
    best_step = int(Path(deep["best_checkpoint"]).name.split("step")[1].split("-")[0])
    assert deep_row[-1] == str(best_step) and next(ln for ln in body if ln.startswith("itq8")).split()[-1] == "-"
    best = max(maps, key=maps.get)
    assert f"best run: {out / best}" in text
    table = json.loads((tmp_path / "cmp" / "comparison.json").read_text())
    assert [r["name"] for r in table] == [ln.split()[0] for ln in body]
    for name in ("pr_curves", "map_vs_bits"):
        assert (tmp_path / "cmp" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
        assert (tmp_path / "cmp" / f"{name}.pdf").read_bytes()[:5] == b"%PDF-"


def test_compare_refuses_an_unfinished_run_by_name(runs, tmp_path, capsys):
    out, _ = runs
    (tmp_path / "half").mkdir()
    assert cli.main(["compare", str(out / "itq12"), str(tmp_path / "half"), "--no-plots"]) == 2
    err = capsys.readouterr().err
    assert "half: no metrics.json" in err and "Traceback" not in err


def test_compare_logs_a_wandb_table(runs):
    from dsrh_lightning.runs.compare import log_to_wandb, read_run

    out, _ = runs
    rows = [read_run(out / n) for n in ("itq12", "lsh12")]
    table = log_to_wandb(rows, {}, "dsrh-test", mode="offline")
    assert table.columns[:3] == ["run", "dataset", "method"] and len(table.data) == 2
    assert [r[0] for r in table.data] == sorted(["itq12", "lsh12"], key=lambda n: -read_run(out / n).map)


def test_sweep_local_ends_with_the_best_run_by_its_metric_and_the_table(tmp_path, capsys):
    """The best run is the sweep metric's (validation) best, even when another run tests higher."""
    from dsrh_lightning.runs.sweep_local import run_sweep_local

    def fake(args, out, name):
        bits = int(next(a.split("=")[1] for a in args if a.startswith("--model.bits=")))
        metrics = {"best_val_map": {12: 0.5, 24: 0.7}[bits], "test/map": {12: 0.65, 24: 0.6}[bits],
                   "test/precision_radius": 0.3}
        (out / name / "plots").mkdir(parents=True)
        (out / name / "metrics.json").write_text(json.dumps(metrics))
        (out / name / "plots" / "curves.json").write_text(json.dumps(
            {"dataset": "synthetic", "method": "dsrh", "bits": bits, "seed": 0, "step": 40,
             "pr_curve": {"precision": [0.9, 0.1], "recall": [0.2, 1.0]}}))
        return 0, metrics

    run_sweep_local("bits.yaml", 2, ["dataset=synthetic"], tmp_path / "sw", run_fn=fake)
    text = capsys.readouterr().out
    assert f"sweep best run by best_val_map (maximize): {tmp_path / 'sw' / 'bits-001'} (best_val_map=0.7000)" in text
    rows = [ln.split() for ln in text.splitlines() if ln.startswith("bits-00")]
    assert [r[0] for r in rows] == ["bits-000", "bits-001"] and rows[0][5] == "0.6500"
    assert (tmp_path / "sw" / "comparison" / "pr_curves.png").is_file()


def test_baseline_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert cli.main(["baseline", "itq", "--bits", "12", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path}: no config.yaml" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["baseline", "kmeans", "--bits", "12"])
    assert "invalid choice: 'kmeans'" in capsys.readouterr().err


def test_baseline_from_a_run_never_writes_into_that_run(runs, capsys):
    """--run without name= gets a folder of its own; name= of a folder holding a run is refused."""
    out, deep = runs
    run_dir = Path(deep["run_dir"])
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.json")}
    assert cli.main(["baseline", "pcah", "--bits", "8", "--run", str(run_dir), "--no-plots"]) == 0
    made = [p for p in out.iterdir() if p.name.startswith("synthetic-pcah-8b-s")]
    assert len(made) == 1, f"expected one new pcah run folder under {out}, found {made}"
    assert json.loads((made[0] / "metrics.json").read_text())["method"] == "pcah"
    assert {p: (run_dir / p).read_bytes() for p in before} == before, "the deep run's files were rewritten"
    capsys.readouterr()
    assert cli.main(["baseline", "pcah", "--bits", "8", "--run", str(run_dir), "--no-plots", "name=deep"]) == 2
    err = capsys.readouterr().err
    assert f"{run_dir}: already holds a run" in err and "Traceback" not in err
    assert {p: (run_dir / p).read_bytes() for p in before} == before


def _fake_run(folder: Path, metrics=None, curves=None, config=None) -> Path:
    """A run folder holding the given files (dicts as JSON / YAML, str as written)."""
    folder.mkdir(parents=True)
    for name, value in (("metrics.json", metrics), ("plots/curves.json", curves), ("config.yaml", config)):
        if value is None:
            continue
        (folder / name).parent.mkdir(exist_ok=True)
        (folder / name).write_text(value if isinstance(value, str) else json.dumps(value))
    return folder


@pytest.mark.parametrize("files, file, says", [
    ({"metrics": {"test/precision_radius": 0.5}}, "metrics.json", "no test/map"),
    ({"metrics": "{not json"}, "metrics.json", "not readable JSON"),
    ({"metrics": "[0.5]"}, "metrics.json", "expected a JSON object"),
    ({"metrics": {"test/map": 0.5}, "curves": "{\"step\": "}, "curves.json", "not readable JSON"),
    ({"metrics": {"test/map": 0.5}, "config": "model: [bits: 12"}, "config.yaml", "not readable YAML"),
    ({"metrics": {"test/map": 0.5}, "config": "just a line"}, "config.yaml", "expected a YAML mapping"),
    ({"metrics": {"test/map": "high"}}, "", "is not a number"),
])
def test_compare_names_a_bad_file_without_a_traceback(tmp_path, capsys, files, file, says):
    good = _fake_run(tmp_path / "good", metrics={"test/map": 0.4})
    bad = _fake_run(tmp_path / "bad", **files)
    assert cli.main(["compare", str(good), str(bad), "--no-plots"]) == 2
    err = capsys.readouterr().err
    named = (bad / "plots" / file) if file == "curves.json" else (bad / file) if file else bad
    assert f"error: {named}: " in err and says in err, f"expected '{named}: ...{says}' in: {err}"
    assert "Traceback" not in err


def _row(name, dataset, method, bits, map_, radius=2, p_r=0.5):
    from dsrh_lightning.runs.compare import RunResult

    return RunResult(path=f"/runs/{name}", name=name, dataset=dataset, method=method, bits=bits, seed=0, map=map_,
                     precision_radius=p_r, radius=radius, ndcg=None, step=None)


def test_map_vs_bits_never_pools_runs_of_different_data_sets():
    from dsrh_lightning.runs.compare import map_series

    rows = [_row("a", "cifar10", "itq", 12, 0.2), _row("b", "nuswide", "itq", 12, 0.6),
            _row("c", "cifar10", "itq", 12, 0.3), _row("d", "nuswide", "dsrh", 24, 0.7)]
    assert map_series(rows) == {"itq on cifar10": {12: [0.2, 0.3]}, "itq on nuswide": {12: [0.6]},
                                "dsrh on nuswide": {24: [0.7]}}
    # one data set: the method alone names the line, its runs (seeds) pooled per code length
    assert map_series(rows[::2]) == {"itq": {12: [0.2, 0.3]}}


def test_precision_column_names_each_radius_when_the_runs_differ():
    from dsrh_lightning.runs.compare import format_table

    same = format_table([_row("a", "c", "itq", 12, 0.2, radius=2, p_r=0.25), _row("b", "c", "lsh", 12, 0.1)])
    assert same.splitlines()[0].split()[6] == "P@r<=2" and same.splitlines()[2].split()[6] == "0.2500"
    mixed = format_table([_row("a", "c", "itq", 12, 0.2, radius=2, p_r=0.25),
                          _row("b", "c", "lsh", 12, 0.1, radius=0, p_r=0.125),
                          _row("e", "c", "sh", 12, 0.05, radius=None, p_r=0.5)])
    lines = mixed.splitlines()
    assert lines[0].split()[6] == "P@r<=r"
    assert [ln.split()[6] for ln in lines[2:]] == ["0.2500(r=2)", "0.1250(r=0)", "0.5000(r=?)"]


def test_baseline_evaluates_every_metric_option_of_the_eval_config(monkeypatch):
    """The baseline passes every option the eval config sets (as the evaluation callback reads them)."""
    import dsrh_lightning.metrics as metrics_pkg
    from dsrh_lightning.metrics.specs import metric_options, options_from
    from dsrh_lightning.runs.baseline import _evaluate, baseline_config

    cfg = baseline_config("itq", 8, ["dataset=synthetic", "eval.ndcg_k=7", "eval.wmap_topk=9"])
    seen = {}
    monkeypatch.setattr(metrics_pkg, "retrieval_metrics",
                        lambda *a, **kw: seen.update(kw) or {"map": 0.25, "pr_curve": {}})
    assert _evaluate(cfg, None, None, None, None) == {"test/map": 0.25}
    e = cfg.eval
    assert seen == {"ties": e.ties, "empty_queries": e.empty_queries, **options_from(lambda n: e.get(n))}
    assert set(metric_options()) <= set(seen) and (seen["ndcg_k"], seen["wmap_topk"]) == (7, 9)
