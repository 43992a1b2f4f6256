"""Retrieval plots: curve data vs brute force, PNG files, `dsrh eval --plots`, W&B logging guard."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from dsrh_lightning import cli
from dsrh_lightning.data.sources import make_synthetic
from dsrh_lightning.plots.figures import fixed_queries, make_figures, save_figures

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_png(path: Path, min_w: int, min_h: int) -> tuple:
    assert path.is_file(), path
    assert path.read_bytes()[:8] == PNG_MAGIC, path
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    assert w >= min_w and h >= min_h and w <= 4000 and h <= 4000, (path, w, h)
    assert arr.std() > 5, f"{path} looks blank"
    return w, h


def structured_codes(rng, labels: np.ndarray, bits: int, flips: int) -> np.ndarray:
    protos = rng.integers(0, 2, (labels.max() + 1, bits), dtype=np.uint8)
    x = protos[labels].copy()
    for row in x:
        row[rng.choice(bits, rng.integers(0, flips + 1), replace=False)] ^= 1
    return x


def test_plot_data_matches_brute_force_and_pngs(tmp_path):
    rng = np.random.default_rng(0)
    src = make_synthetic(6, 40, 32, seed=1)
    labels = src.labels
    codes = structured_codes(rng, labels, 16, flips=5)
    q_pos = np.arange(0, 240, 8)  # 30 queries
    db_pos = np.setdiff1d(np.arange(240), q_pos)
    qc, dc, ql, dl = codes[q_pos], codes[db_pos], labels[q_pos], labels[db_pos]
    out = make_figures(qc, dc, ql, dl, max_radius=3, num_queries=4, topn=10,
                       query_image=lambda i: src.images[q_pos[i]], db_image=lambda j: src.images[db_pos[j]])
    data = out["data"]

    dist = (qc[:, None] != dc[None]).sum(-1)
    rel = ql[:, None] == dl[None]
    # PR by radius: micro-averaged counts; recall can only grow with the radius and reaches 1.
    pr = data["pr_curve"]
    for r in range(17):
        inside = dist <= r
        assert pr["precision"][r] == pytest.approx((rel & inside).sum() / max(inside.sum(), 1))
        assert pr["recall"][r] == pytest.approx((rel & inside).sum() / rel.sum())
    assert np.all(np.diff(pr["recall"]) >= 0) and pr["recall"][-1] == pytest.approx(1.0)
    assert pr["precision"][-1] == pytest.approx(rel.mean())
    # Precision within radius r: mean over queries, 0 for an empty ball.
    for r, p in zip(data["radii"], data["precision_radius"]):
        inside = dist <= r
        per_q = np.where(inside.sum(1) > 0, (rel & inside).sum(1) / np.maximum(inside.sum(1), 1), 0.0)
        assert p == pytest.approx(per_q.mean()), r
    # Precision@k under the stable ranking (distance, then database index).
    order = np.stack([np.lexsort((np.arange(len(dc)), d)) for d in dist])
    ranked_rel = np.take_along_axis(rel, order, 1)
    assert data["ks"][-1] == len(dc)
    for k, p in zip(data["ks"], data["precision_at_k"]):
        assert p == pytest.approx(ranked_rel[:, :k].mean()), k
    # The grid shows the stable top 10 of fixed, evenly spread queries, marked by relevance.
    g = data["grid"]
    np.testing.assert_array_equal(g["queries"], fixed_queries(4, len(qc)))
    np.testing.assert_array_equal(g["indices"], order[g["queries"], :10])
    np.testing.assert_array_equal(g["correct"], ranked_rel[g["queries"], :10])
    assert g["correct"].any() and (~g["correct"]).any()  # both border colours appear

    paths = save_figures(out["figures"], tmp_path / "plots")
    assert set(paths) == {"pr_curve", "precision_at_k", "precision_radius", "retrieval_grid"}
    for name in ("pr_curve", "precision_at_k", "precision_radius"):
        check_png(paths[name], 300, 250)
    w, h = check_png(paths["retrieval_grid"], 11 * 60, 4 * 60)
    assert w > h  # 11 columns, 4 rows
    # Borders: the grid contains the green and the red marker colours.
    arr = np.asarray(Image.open(paths["retrieval_grid"]).convert("RGB")).reshape(-1, 3).astype(int)
    for colour in ((0x1a, 0x98, 0x50), (0xd7, 0x30, 0x27)):
        assert (np.abs(arr - colour).sum(1) < 30).sum() > 200, colour


def test_eval_cli_writes_plots(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    out = tmp_path / "plots"
    rc = cli.main(["eval", "--ckpt", str(ckpt), "--plots", str(out), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for name in ("pr_curve", "precision_at_k", "precision_radius", "retrieval_grid"):
        check_png(out / f"{name}.png", 300, 250)


def _test_with_logger(ckpt, logger):
    import pytorch_lightning as pl

    from dsrh_lightning.lightning.callbacks import RetrievalPlots
    from dsrh_lightning.data.datamodule import HashingDataModule
    from dsrh_lightning.runs.checkpoints import load_run

    run = load_run(ckpt)
    cfg = run.cfg
    dm = HashingDataModule(cfg)
    plots = RetrievalPlots(cfg.eval)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger, callbacks=[plots], enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.test(run.module, datamodule=dm, verbose=False)
    return plots


def test_plots_logged_to_wandb_only(tiny_ckpt, tmp_path):
    import wandb
    from pytorch_lightning.loggers import CSVLogger, WandbLogger

    ckpt, _ = tiny_ckpt

    class Run:
        def __init__(self):
            self.logged = []

        def log(self, data, *args, **kwargs):
            self.logged.append(data)

    class RecordingWandb(WandbLogger):  # a WandbLogger whose run records instead of uploading
        def __init__(self):
            super().__init__(project="test", save_dir=str(tmp_path), offline=True)
            self._run_stub = Run()

        @property
        def experiment(self):
            return self._run_stub

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    wb = RecordingWandb()
    plots = _test_with_logger(ckpt, wb)
    images = {k: v for d in wb.experiment.logged for k, v in d.items() if isinstance(v, wandb.Image)}
    assert set(images) == {f"test/plots/{n}" for n in ("pr_curve", "precision_at_k", "precision_radius",
                                                        "retrieval_grid")}
    assert plots.data["pr_curve"]["recall"][-1] == pytest.approx(1.0)
    # CSV logger and no logger: nothing is computed or written.
    for logger in (CSVLogger(str(tmp_path), name="csv"), False):
        plots = _test_with_logger(ckpt, logger)
        assert plots.data == {} and plots.written == {}


def _texts(fig) -> str:
    parts = [fig._suptitle.get_text() if fig._suptitle else ""]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
    return "\n".join(parts)


def test_titles_class_names_formats_and_dpi(tmp_path):
    """Every title carries the run identity; the grid names each image's classes; png (200 dpi), pdf, svg."""
    from dsrh_lightning.data.sources import CIFAR10_CLASSES
    from dsrh_lightning.plots.figures import DPI, label_names, run_identity
    from omegaconf import OmegaConf

    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 6)
    codes = structured_codes(rng, labels, 12, flips=3)
    imgs = rng.integers(0, 255, (60, 8, 8, 3), dtype=np.uint8)
    q_pos, db_pos = np.arange(0, 60, 6), np.setdiff1d(np.arange(60), np.arange(0, 60, 6))
    cfg = OmegaConf.create({"data": {"dataset": "cifar10"}, "experiment": "dsrh", "model": {"bits": 12}})
    identity = run_identity(cfg)
    assert identity == "cifar10 / dsrh / 12 bits"
    out = make_figures(codes[q_pos], codes[db_pos], labels[q_pos], labels[db_pos], num_queries=3, topn=4,
                       query_image=lambda i: imgs[q_pos[i]], db_image=lambda j: imgs[db_pos[j]],
                       identity=identity, class_names=CIFAR10_CLASSES)
    figs, g = out["figures"], out["data"]["grid"]
    for name, fig in figs.items():
        assert identity in _texts(fig), name
    grid_text = _texts(figs["retrieval_grid"])
    for r, qp in enumerate(g["queries"]):
        assert g["query_names"][r] == CIFAR10_CLASSES[labels[q_pos[qp]]]
        assert g["result_names"][r] == [CIFAR10_CLASSES[labels[db_pos[j]]] for j in g["indices"][r]]
        assert g["query_names"][r] in grid_text
    # multi-hot rows: concept names, at most two then a count; unknown names fall back to ids
    assert label_names(np.array([1, 0, 1, 1]), ("sky", "clouds", "person", "water")) == "sky,person+1"
    assert label_names(np.array([0, 0]), ("a", "b")) == "-" and label_names(np.int64(7), None) == "7"

    png = save_figures({"pr_curve": figs["pr_curve"]}, tmp_path / "png", close=False)["pr_curve"]
    with Image.open(png) as im:
        w, h = im.size
        assert round(im.info["dpi"][0]) == DPI == 200
    fw, fh = figs["pr_curve"].get_size_inches()
    assert (w, h) == (round(fw * DPI), round(fh * DPI))
    pdf = save_figures({"pr_curve": figs["pr_curve"]}, tmp_path / "pdf", fmt="pdf", close=False)["pr_curve"]
    assert pdf.suffix == ".pdf" and pdf.read_bytes()[:5] == b"%PDF-"
    svg = save_figures(figs, tmp_path / "svg", fmt="svg")["pr_curve"]
    assert svg.suffix == ".svg" and b"<svg" in svg.read_bytes()[:2000]
    with pytest.raises(ValueError, match="png, pdf, svg"):
        save_figures({}, tmp_path, fmt="jpg")


def test_eval_cli_plots_format_svg_with_identity(tiny_ckpt, tmp_path, capsys, monkeypatch):
    import matplotlib

    monkeypatch.setitem(matplotlib.rcParams, "svg.fonttype", "none")  # text stays searchable in the SVG
    ckpt, cfg = tiny_ckpt
    out = tmp_path / "plots"
    rc = cli.main(["eval", "--ckpt", str(ckpt), "--plots", str(out), "--plots-format", "svg", "--json"])
    assert rc == 0, capsys.readouterr().err
    identity = f"{cfg.data.dataset} / {cfg.experiment} / {cfg.model.bits} bits"
    for name in ("pr_curve", "precision_at_k", "precision_radius", "retrieval_grid"):
        text = (out / f"{name}.svg").read_text()
        assert text.lstrip().startswith("<?xml") and identity in text, name
    from dsrh_lightning.data.datamodule import load_source

    names = load_source(cfg.data, cfg.seed)[0].class_names
    grid = (out / "retrieval_grid.svg").read_text()
    assert sum(n in grid for n in names) >= 2  # images are labelled with their class names
    assert not list(out.glob("*.png"))


# ---- plots a person can read: run folder, titles, labels, failures -------------------------------------------


def _train(overrides):
    from dsrh_lightning.config import load_config
    from dsrh_lightning.runs.train import train

    return train(load_config(overrides))


def test_training_writes_plots_and_curves_without_a_logger(tiny_overrides, tmp_path, capsys):
    """runs/<name>/plots/ gets the figures and curves.json whatever the logger; the titles name the data set,
    method, bits, split, the tested checkpoint's step and its MAP; a cached-feature run's grid shows images."""
    import json

    from dsrh_lightning.plots.figures import CURVES_FILE

    res = _train(tiny_overrides + ["logger.name=none", "data.cache_features=true",
                                   f"data.feature_dir={tmp_path / 'features'}"])
    plots = Path(res["run_dir"]) / "plots"
    for name in ("pr_curve", "precision_at_k", "precision_radius"):
        check_png(plots / f"{name}.png", 600, 500)
    w, h = check_png(plots / "retrieval_grid.png", 11 * 100, 5 * 100)
    grid = np.asarray(Image.open(plots / "retrieval_grid.png").convert("RGB")).astype(int)
    # images, not feature vectors: many distinct colours (the synthetic images are colourful tiles)
    assert len(np.unique(grid.reshape(-1, 3)[:: 7], axis=0)) > 500
    rec = json.loads((plots / CURVES_FILE).read_text())
    best_step = int(Path(res["best_checkpoint"]).name.split("step")[1].split("-")[0])
    assert rec["step"] == best_step and rec["split"] == "test"
    assert (rec["dataset"], rec["method"], rec["bits"], rec["seed"]) == ("synthetic", "dsrh", 12, 0)
    assert rec["metrics"]["map"] == pytest.approx(res["test/map"])
    assert len(rec["pr_curve"]["precision"]) == 13 and rec["pr_curve"]["recall"][-1] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert f"[test step {best_step}]" in out and "plots written to" in out


def test_a_failing_plot_warns_and_the_run_keeps_its_metrics(tiny_overrides, monkeypatch, caplog):
    import json

    from dsrh_lightning.plots import figures

    def broken(*args, **kwargs):
        raise TypeError("Invalid shape (1280,) for image data")

    monkeypatch.setattr(figures, "make_figures", broken)
    res = _train(tiny_overrides + ["logger.name=none", "trainer.max_steps=6"])
    run = Path(res["run_dir"])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 < metrics["test/map"] <= 1.0
    assert not list((run / "plots").glob("*.png")) if (run / "plots").exists() else True
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "plots failed" in r.getMessage()]
    assert warned and "Invalid shape (1280,)" in warned[0].getMessage()


def test_eval_prints_the_checkpoints_step(tiny_ckpt, capsys):
    ckpt, cfg = tiny_ckpt
    assert cli.main(["eval", "--ckpt", str(ckpt)]) == 0
    assert f"[test step {cfg.trainer.max_steps}]" in capsys.readouterr().out  # not [test step 0]


def test_pr_radius_labels_sit_at_their_points_and_never_overlap():
    import matplotlib.pyplot as plt

    from dsrh_lightning.plots.figures import plot_pr_curve

    # a crowded curve: 49 radii, most of them bunched at recall 1 (as real PR curves of long codes are)
    recall = np.concatenate([np.linspace(0.05, 0.97, 10), 1 - np.geomspace(0.02, 1e-6, 39)])
    precision = np.concatenate([np.linspace(0.9, 0.3, 10), np.linspace(0.3, 0.1, 39)])
    fig = plot_pr_curve({"recall": recall, "precision": precision}, "t")
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    labels = [t for t in ax.texts if t.get_text().startswith("r=")]
    assert len(labels) >= 5 and labels[0].get_text() == "r=0"
    boxes = [t.get_window_extent(renderer) for t in labels]
    for i in range(len(boxes)):
        for j in range(i + 1, len(boxes)):
            a, b = boxes[i], boxes[j]
            assert a.x1 <= b.x0 or b.x1 <= a.x0 or a.y1 <= b.y0 or b.y1 <= a.y0, (labels[i], labels[j])
    points = ax.transData.transform(np.column_stack([recall, precision]))
    for t, box in zip(labels, boxes):
        x, y = points[int(t.get_text()[2:])]
        # beside its point (same level) or above/below it (same column), within 20 pixels
        level = box.y0 <= y <= box.y1 and min(abs(box.x0 - x), abs(box.x1 - x)) < 20
        column = box.x0 <= x <= box.x1 and min(abs(box.y0 - y), abs(box.y1 - y)) < 20
        assert level or column, t.get_text()
    plt.close(fig)


def test_overlaid_curves_and_map_vs_bits_have_legends():
    import matplotlib.pyplot as plt

    from dsrh_lightning.plots.figures import plot_map_vs_bits, plot_pr_curves, run_details, thumbnail

    pr = {"recall": [0.2, 0.6, 1.0], "precision": [0.9, 0.5, 0.1]}
    fig = plot_pr_curves({"dsrh 12b s0": pr, "itq 12b s0": {"recall": [0.1, 1.0], "precision": [0.5, 0.1]}})
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == ["dsrh 12b s0", "itq 12b s0"]
    assert not [t for t in fig.axes[0].texts if t.get_text().startswith("r=")]  # no radius labels when overlaid
    plt.close(fig)
    fig = plot_map_vs_bits({"dsrh": {12: [0.5, 0.6], 48: [0.7]}, "itq": {12: [0.3], 48: [0.4]}})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["dsrh (2 runs)", "itq"]
    line = ax.get_lines()[0]
    np.testing.assert_allclose(np.asarray(line.get_xdata(), dtype=float), [12, 48])
    np.testing.assert_allclose(np.asarray(line.get_ydata(), dtype=float), [0.55, 0.7])  # the mean over the runs
    plt.close(fig)
    assert run_details("test", 300, 0.61234) == "test split, step 300, MAP 0.6123"
    assert run_details("", None, None) == ""
    with pytest.raises(ValueError, match="not an image"):
        thumbnail(np.zeros(1280, dtype=np.float32))
    assert thumbnail(np.zeros((400, 200, 3), dtype=np.uint8)).shape == (96, 48, 3)


def test_curve_data_follows_eval_ties_for_precision_at_k():
    """ties='average': precision@k is the expectation over random orders of equal distances (a loop here);
    the curves by radius do not depend on ties."""
    from dsrh_lightning.plots.figures import curve_data

    rng = np.random.default_rng(3)
    qc, dc = rng.integers(0, 2, (7, 4), dtype=np.uint8), rng.integers(0, 2, (40, 4), dtype=np.uint8)
    ql, dl = rng.integers(0, 3, 7), rng.integers(0, 3, 40)
    stable, average = (curve_data(qc, dc, ql, dl, ks=[1, 3, 10, 25], ties=t) for t in ("stable", "average"))
    dist, rel = (qc[:, None] != dc[None]).sum(-1), ql[:, None] == dl[None]
    for k, p in zip(average["ks"], average["precision_at_k"]):
        per_q = []
        for d, r in zip(dist, rel):
            kth = np.sort(d)[k - 1]
            closer, tied = d < kth, d == kth
            per_q.append((r[closer].sum() + (k - closer.sum()) * r[tied].mean()) / k)
        assert p == pytest.approx(np.mean(per_q), abs=1e-12), k
    assert stable["precision_at_k"] != average["precision_at_k"]  # 4-bit codes: ties everywhere
    assert stable["pr_curve"] == average["pr_curve"] and stable["precision_radius"] == average["precision_radius"]


def test_plot_callback_computes_every_metric_option_of_the_eval_config(monkeypatch):
    """Without the evaluation callback's results, the plots callback passes every option the eval config
    sets (as options_from reads them), not a hand-written subset."""
    from types import SimpleNamespace

    import dsrh_lightning.metrics as metrics_pkg
    from dsrh_lightning.config import load_config
    from dsrh_lightning.lightning.callbacks.plots import RetrievalPlots
    from dsrh_lightning.metrics.specs import metric_options, options_from

    cfg = load_config(["dataset=synthetic", "eval.ndcg_k=7", "eval.acg_k=3", "eval.ties=average"]).eval
    seen = {}
    monkeypatch.setattr(metrics_pkg, "retrieval_metrics", lambda *a, **kw: seen.update(kw) or {"map": 0.5})
    got = RetrievalPlots(cfg)._metrics(SimpleNamespace(callbacks=[]), None, None, None, None)
    assert got == {"map": 0.5}
    want = {"ties": "average", "empty_queries": cfg.empty_queries, **options_from(lambda n: cfg.get(n))}
    assert seen == want and set(metric_options()) <= set(seen), f"passed {sorted(seen)}"
    assert (seen["ndcg_k"], seen["acg_k"]) == (7, 3)
