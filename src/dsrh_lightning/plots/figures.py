"""Retrieval pictures (matplotlib, Agg): precision-recall by Hamming radius, precision@k,
precision within Hamming radius 0..r, and a retrieval grid like Fig. 5 of the DSRH paper.

Overlaid comparisons of several runs: precision-recall curves and MAP against code length.

Data functions (``curve_data``, ``grid_data``) are separate from the drawing
functions, which each return a :class:`matplotlib.figure.Figure`. ``curves.json`` (``curve_record``)
keeps a run's curve data so that later comparisons overlay curves without re-encoding anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import numpy as np
import torch

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ..files import atomic_write  # noqa: E402
from ..search.engines import search_torch  # noqa: E402
from ..metrics import codes_to_bits, retrieval_metrics  # noqa: E402
from ..relevance import relevance_matrix  # noqa: E402

__all__ = ["curve_data", "grid_data", "fixed_queries", "plot_pr_curve", "plot_precision_at_k",
           "plot_precision_radius", "plot_retrieval_grid", "make_figures", "save_figures", "figure_to_image",
           "run_identity", "label_names", "FORMATS", "DPI", "run_details", "thumbnail", "plot_pr_curves",
           "plot_map_vs_bits", "curve_record", "CURVES_FILE"]

CORRECT, WRONG = "#1a9850", "#d73027"
FORMATS = ("png", "pdf", "svg")
DPI = 200  # saved figures
CURVES_FILE = "curves.json"  # a run's curve data, beside its plots
THUMB = 96  # longest side of an image drawn in the retrieval grid


def run_identity(cfg) -> str:
    """``<dataset> / <experiment> / <bits> bits`` of a run config (the figures' subtitle)."""
    try:
        return f"{cfg.data.dataset} / {cfg.experiment} / {int(cfg.model.bits)} bits"
    except AttributeError:
        return ""


def run_details(split: str = "", step: Optional[int] = None, map_value: Optional[float] = None) -> str:
    """``test split, step 300, MAP 0.6543``: the parts that are known, for a figure's subtitle."""
    parts = [f"{split} split" if split else "", f"step {int(step)}" if step is not None else "",
             f"MAP {float(map_value):.4f}" if map_value is not None else ""]
    return ", ".join(p for p in parts if p)


def thumbnail(img, size: int = THUMB) -> np.ndarray:
    """An image as an ``(h, w, 3)`` uint8 array whose longest side is at most ``size`` pixels.

    Raises ValueError for anything that is not an image (e.g. a 1-D feature vector)."""
    arr = np.asarray(img)
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, -1)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"not an image: an array of shape {arr.shape} (expected (h, w, 3))")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, 2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255).astype(np.uint8)
    if max(arr.shape[:2]) > size:
        from PIL import Image

        im = Image.fromarray(arr)
        im.thumbnail((size, size))
        arr = np.asarray(im)
    return arr


def label_names(label, class_names: Optional[Sequence[str]], max_names: int = 2) -> str:
    """A class id or multi-hot row as text: class (concept) names where known, else ids."""
    arr = np.asarray(label)
    ids = [int(arr)] if arr.ndim == 0 else np.flatnonzero(arr).tolist()

    def name(i: int) -> str:
        return str(class_names[i]) if class_names is not None and 0 <= i < len(class_names) else str(i)

    text = ",".join(name(i) for i in ids[:max_names])
    return text + (f"+{len(ids) - max_names}" if len(ids) > max_names else "") if ids else "-"


def _titled(title: str, *lines: str) -> str:
    return "\n".join([title] + [ln for ln in lines if ln])


def _default_ks(nd: int) -> list:
    ks = [1, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000]
    return [k for k in ks if k < nd] + [nd]


def curve_data(q_codes, db_codes, q_labels, db_labels, max_radius: int = 3, ks: Optional[Sequence[int]] = None,
               empty_queries: str = "zero", ties: str = "stable") -> dict:
    """Everything the curves need, from :func:`~dsrh_lightning.metrics.retrieval_metrics`.

    ``ties`` (``eval.ties``) orders equal distances for ``precision_at_k``, as in the run's metrics; the
    curves by radius do not depend on it.

    Returns:
        ``pr_curve`` (micro-averaged precision/recall by radius 0..bits), ``ks`` and
        ``precision_at_k``, ``radii`` and ``precision_radius`` (mean per query, 0 for an
        empty ball, as the metric ``precision_radius``).
    """
    q, db = codes_to_bits(q_codes, "query codes"), codes_to_bits(db_codes, "database codes")
    nd = db.shape[0]
    ks = sorted(set(int(k) for k in (ks or _default_ks(nd)) if 1 <= k <= nd))
    base = retrieval_metrics(q, db, q_labels, db_labels, topk=1, radius=0, precision_at=tuple(ks), pr_curve=True,
                             empty_queries=empty_queries, ties=ties)
    radii = list(range(0, min(max_radius, q.shape[1]) + 1))
    prec_r = [base["precision_radius"]] + [
        retrieval_metrics(q, db, q_labels, db_labels, topk=1, radius=r, empty_queries=empty_queries)["precision_radius"]
        for r in radii[1:]]
    return {"pr_curve": base["pr_curve"], "ks": ks, "precision_at_k": [base[f"precision@{k}"] for k in ks],
            "radii": radii, "precision_radius": prec_r, "bits": int(q.shape[1]), "num_queries": int(q.shape[0]),
            "num_database": int(nd)}


def fixed_queries(num_queries: int, n: int) -> np.ndarray:
    """``num_queries`` query positions spread evenly over ``0..n-1`` (the same every run)."""
    return np.unique(np.linspace(0, n - 1, num=min(num_queries, n)).round().astype(np.int64))


def grid_data(q_codes, db_codes, q_labels, db_labels, queries: Sequence[int], topn: int = 10) -> dict:
    """Top ``topn`` (stable Hamming ranking) of the selected ``queries``: indices, distances, correctness."""
    q, db = codes_to_bits(q_codes, "query codes"), codes_to_bits(db_codes, "database codes")
    queries = np.asarray(queries, dtype=np.int64)
    dist, idx = search_torch(q[queries].numpy(), db.numpy(), topn)
    ql = torch.as_tensor(np.asarray(q_labels))[torch.as_tensor(queries)]
    rel = relevance_matrix(ql, torch.as_tensor(np.asarray(db_labels)))
    correct = np.take_along_axis(rel.numpy(), idx, 1)
    return {"queries": queries, "indices": idx, "distances": dist, "correct": correct.astype(bool)}


def _overlaps(box, boxes, pad: float = 2.0) -> bool:
    return any(box.x0 - pad < b.x1 and b.x0 - pad < box.x1 and box.y0 - pad < b.y1 and b.y0 - pad < box.y1
               for b in boxes)


def _label_radii(ax, rec: np.ndarray, prec: np.ndarray, fontsize: float = 7) -> list:
    """Write ``r=<radius>`` beside the curve's points where a label fits without touching another label,
    the curve's markers or the axes' edges (tries right, left, above, below each point; a point with no
    room stays unlabelled). Returns the annotations."""
    fig = ax.figure
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pts = ax.transData.transform(np.column_stack([rec, prec]))
    placed, boxes = [], []
    # right, left, above, below the point; the label is centred on the point's level or column
    offsets = (((6, 0), "left", "center"), ((-6, 0), "right", "center"), ((0, 6), "center", "bottom"),
               ((0, -6), "center", "top"))
    for r in range(len(rec)):
        if r and np.hypot(*(pts[r] - pts[r - 1])) < 1e-6:
            continue  # the same point as the radius before: already labelled (or not) there
        for (dx, dy), ha, va in offsets:
            ann = ax.annotate(f"r={r}", (rec[r], prec[r]), textcoords="offset points", xytext=(dx, dy),
                              ha=ha, va=va, fontsize=fontsize, color="#333333")
            box = ann.get_window_extent(renderer)
            inside = frame.x0 <= box.x0 and box.x1 <= frame.x1 and frame.y0 <= box.y0 and box.y1 <= frame.y1
            hits_marker = any(box.x0 - 2 <= x <= box.x1 + 2 and box.y0 - 2 <= y <= box.y1 + 2 for x, y in pts)
            if inside and not hits_marker and not _overlaps(box, boxes):
                placed.append(ann)
                boxes.append(box)
                break
            ann.remove()
    return placed


_COLOURS = ("#2166ac", "#b2182b", "#1b7837", "#762a83", "#e08214", "#35978f", "#8c510a", "#c51b7d", "#4d4d4d")


def plot_pr_curves(curves: Dict[str, dict], title: str = "Precision-recall (Hamming ranking)",
                   label_radii: Optional[bool] = None):
    """Precision vs recall of the Hamming ball of radius 0..bits, one line per entry of ``curves``
    (``label -> {"precision": [...], "recall": [...]}``), with a legend when there are several or a label
    is given. ``label_radii`` (default: a single curve) writes ``r=<radius>`` where the labels do not overlap."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    ax.set(xlim=(0, 1.02), ylim=(0, 1.05), xlabel="recall", ylabel="precision", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    for i, (label, pr) in enumerate(curves.items()):
        rec, prec = np.asarray(pr["recall"], dtype=float), np.asarray(pr["precision"], dtype=float)
        ax.plot(rec, prec, "-o", color=_COLOURS[i % len(_COLOURS)], markersize=3, label=label or None)
    if len(curves) > 1 or any(curves):
        ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    if label_radii if label_radii is not None else len(curves) == 1:
        pr = next(iter(curves.values()))
        _label_radii(ax, np.asarray(pr["recall"], dtype=float), np.asarray(pr["precision"], dtype=float))
    return fig


def plot_pr_curve(pr: dict, title: str = "Precision-recall (Hamming ranking)"):
    """Precision vs recall of the Hamming ball of radius 0..bits; ``r=<radius>`` labels where they fit."""
    return plot_pr_curves({"": pr}, title)


def plot_map_vs_bits(series: Dict[str, Dict[int, Sequence[float]]], title: str = "MAP vs code length"):
    """MAP against code length, one line per method: ``series[method][bits]`` lists the runs' MAPs (seeds);
    the line joins the means and each bar spans the lowest to the highest run."""
    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=100)
    all_bits = sorted({b for s in series.values() for b in s})
    for i, (method, by_bits) in enumerate(sorted(series.items())):
        bits = sorted(by_bits)
        vals = [np.asarray(by_bits[b], dtype=float) for b in bits]
        mean = np.array([v.mean() for v in vals])
        err = np.array([[m - v.min() for m, v in zip(mean, vals)], [v.max() - m for m, v in zip(mean, vals)]])
        n = max(len(v) for v in vals)
        ax.errorbar(bits, mean, yerr=err, fmt="-o", markersize=4, capsize=3, color=_COLOURS[i % len(_COLOURS)],
                    label=f"{method} ({n} run{'s' if n > 1 else ''})" if n > 1 else method)
    ax.set_xticks(all_bits)
    ax.set(xlabel="code length (bits)", ylabel="MAP", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_precision_at_k(ks: Sequence[int], precision: Sequence[float], title: str = "Precision@k"):
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
    ax.plot(ks, precision, "-o", color="#b2182b", markersize=3)
    ax.set_xscale("log")
    ax.set(ylim=(0, 1.02), xlabel="number of top returned items k", ylabel="precision", title=title)
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig


def plot_precision_radius(radii: Sequence[int], precision: Sequence[float],
                          title: str = "Precision within Hamming radius"):
    fig, ax = plt.subplots(figsize=(5, 4.2), dpi=100)
    bars = ax.bar(list(radii), precision, color="#4393c3")
    ax.set_xticks(list(radii))
    for b, v in zip(bars, precision):
        ax.annotate(f"{v:.3f}", (b.get_x() + b.get_width() / 2, v), textcoords="offset points", xytext=(0, 3),
                    ha="center", fontsize=8)
    ax.set(ylim=(0, 1.08), xlabel="Hamming radius r", ylabel="precision (mean over queries)", title=title)
    ax.title.set_fontsize(9)
    fig.tight_layout()
    return fig


def plot_retrieval_grid(query_images: Sequence[np.ndarray], result_images: Sequence[Sequence[np.ndarray]],
                        correct: np.ndarray, distances: Optional[np.ndarray] = None,
                        title: str = "Top retrieved images (green: relevant, red: not)",
                        query_names: Optional[Sequence[str]] = None,
                        result_names: Optional[Sequence[Sequence[str]]] = None):
    """One row per query: the query, then its results with a green (relevant) or red border.
    ``query_names`` / ``result_names``: class names written under each image."""
    rows = len(query_images)
    cols = 1 + max(len(r) for r in result_images)
    fig, axes = plt.subplots(rows, cols, figsize=(1.1 * cols + 0.3, 1.15 * rows + 0.5), dpi=100, squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                img, color, width = query_images[i], "black", 1.0
                ax.set_ylabel(f"query {i + 1}", fontsize=7)
                if query_names is not None:
                    ax.set_xlabel(query_names[i], fontsize=6, labelpad=1)
            elif j - 1 < len(result_images[i]):
                img = result_images[i][j - 1]
                color, width = (CORRECT if correct[i, j - 1] else WRONG), 3.5
                if distances is not None:
                    ax.set_title(f"d={int(distances[i, j - 1])}", fontsize=7, pad=2)
                if result_names is not None:
                    ax.set_xlabel(result_names[i][j - 1], fontsize=6, labelpad=1, color=color)
            else:
                ax.axis("off")
                continue
            ax.imshow(np.asarray(img), interpolation="nearest")
            for s in ax.spines.values():
                s.set_edgecolor(color)
                s.set_linewidth(width)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def make_figures(q_codes, db_codes, q_labels, db_labels, max_radius: int = 3, num_queries: int = 5,
                 topn: int = 10, query_image: Optional[Callable[[int], np.ndarray]] = None,
                 db_image: Optional[Callable[[int], np.ndarray]] = None, empty_queries: str = "zero",
                 identity: str = "", class_names: Optional[Sequence[str]] = None, details: str = "",
                 ties: str = "stable") -> dict:
    """All retrieval figures by name (the grid only when image getters are given), plus ``data``.

    ``identity`` (e.g. :func:`run_identity`) and ``details`` (e.g. :func:`run_details`) are added to
    every title; ``class_names`` label the grid's images (class ids when None). Grid images are drawn as
    thumbnails (:func:`thumbnail`); a getter that returns something other than an image raises ValueError.
    """
    data = curve_data(q_codes, db_codes, q_labels, db_labels, max_radius, empty_queries=empty_queries, ties=ties)
    figs = {"pr_curve": plot_pr_curve(data["pr_curve"], _titled("Precision-recall (Hamming ranking)", identity,
                                                                 details)),
            "precision_at_k": plot_precision_at_k(data["ks"], data["precision_at_k"],
                                                  _titled("Precision@k", identity, details)),
            "precision_radius": plot_precision_radius(data["radii"], data["precision_radius"],
                                                      _titled("Precision within Hamming radius", identity,
                                                              details))}
    if query_image is not None and db_image is not None:
        n = len(q_labels)
        g = grid_data(q_codes, db_codes, q_labels, db_labels, fixed_queries(num_queries, n), topn)
        ql, dl = np.asarray(q_labels), np.asarray(db_labels)
        g["query_names"] = [label_names(ql[int(p)], class_names) for p in g["queries"]]
        g["result_names"] = [[label_names(dl[int(j)], class_names) for j in row] for row in g["indices"]]
        try:
            figs["retrieval_grid"] = plot_retrieval_grid(
                [thumbnail(query_image(int(p))) for p in g["queries"]],
                [[thumbnail(db_image(int(j))) for j in row] for row in g["indices"]], g["correct"], g["distances"],
                _titled("Top retrieved images (green: relevant, red: not)", identity, details),
                g["query_names"], g["result_names"])
        except BaseException:
            for fig in figs.values():
                plt.close(fig)
            raise
        data["grid"] = g
    return {"figures": figs, "data": data}


def curve_record(data: dict, **meta) -> dict:
    """The JSON-ready curve data of :func:`curve_data` (grid left out) with ``meta`` (dataset, method,
    bits, seed, split, step, metrics, ...): what ``curves.json`` holds."""
    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, np.ndarray)):
            return [plain(x) for x in (v.tolist() if isinstance(v, np.ndarray) else v)]
        if isinstance(v, (np.integer,)):
            return int(v)
        if isinstance(v, (np.floating, torch.Tensor)):
            return float(v)
        return v

    keys = ("pr_curve", "ks", "precision_at_k", "radii", "precision_radius", "bits", "num_queries", "num_database")
    return plain({**meta, **{k: data[k] for k in keys if k in data}})


def save_figures(figs: Dict[str, "plt.Figure"], out_dir, close: bool = True, fmt: str = "png",
                 dpi: int = DPI) -> Dict[str, Path]:
    """Write each figure as ``<out_dir>/<name>.<fmt>`` (png, pdf or svg; ``dpi`` for png); returns the paths."""
    if fmt not in FORMATS:
        raise ValueError(f"plot format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in figs.items():
        paths[name] = out / f"{name}.{fmt}"
        with atomic_write(paths[name]) as f:  # a failed write leaves an earlier file as it was
            fig.savefig(f, dpi=dpi, format=fmt)
        if close:
            plt.close(fig)
    return paths


def figure_to_image(fig) -> np.ndarray:
    """The rendered figure as an ``(h, w, 3)`` uint8 array."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
