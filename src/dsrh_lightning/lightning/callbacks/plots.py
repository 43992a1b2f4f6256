"""Retrieval pictures at test end: written as files (png at 200 dpi, pdf or svg) into ``out_dir`` and/or
logged to W&B (with a WandbLogger), titled with the run (data set / method / bits) and the evaluation
(split, checkpoint step, MAP). ``out_dir/curves.json`` keeps the curve data for ``dsrh compare``.

Collects the binarised test codes itself (queries: loader 0, database: loader 1;
under DDP gathered from all ranks like :class:`RetrievalEvaluation`) and draws the
figures of :mod:`dsrh_lightning.plots` on rank 0. Does nothing when there is
neither a W&B logger nor an output folder.

A plot that fails (a figure, a file, the W&B upload) logs a warning naming the error and never stops the
run: the metrics computed by the other callbacks are kept and written.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from .retrieval import CodeCollector, RetrievalEvaluation

__all__ = ["RetrievalPlots", "image_getter"]

log = logging.getLogger(__name__)


def _wandb_loggers(trainer: pl.Trainer) -> list:
    try:
        from pytorch_lightning.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def image_getter(dm, dataset) -> Optional[Callable[[int], np.ndarray]]:
    """``position -> uint8 HWC image`` of an evaluation dataset, untransformed, or None when unknown.

    Reads the data set's own images (``dm.source.images``) at the dataset's source indices, so a run on
    cached backbone features shows the images behind the features, not the feature vectors.
    """
    indices = getattr(dataset, "indices", None)
    images = getattr(getattr(dm, "source", None), "images", None)
    if images is None:  # a dataset used without its data module
        images = getattr(dataset, "images", None)
        if images is not None and getattr(images, "gather", None) is not None:  # cached feature rows
            return None
    if images is None or indices is None:
        return None
    return lambda i: np.asarray(images[int(indices[i])])


class RetrievalPlots(pl.Callback):
    """Draw the test-end retrieval figures.

    Args:
        eval_cfg: the ``eval`` section (threshold, empty-query policy).
        out_dir: folder for the files (``runs/<name>/plots`` in training); None = W&B only.
        run_cfg: the whole run config (titles name data set / method / bits); default the module's.
        step: the checkpoint step written in the titles; default the step of the checkpoint that
            ``trainer.test(ckpt_path=...)`` loaded, else ``trainer.global_step``.
        split: the name of the evaluated query split in the titles.
    """

    def __init__(self, eval_cfg: DictConfig, out_dir: Optional[Path] = None, num_queries: int = 5,
                 topn: int = 10, max_radius: int = 3, fmt: str = "png", run_cfg: Optional[DictConfig] = None,
                 step: Optional[int] = None, split: str = "test") -> None:
        self.cfg = eval_cfg
        self.fmt = fmt
        self.run_cfg = run_cfg
        self.out_dir = Path(out_dir) if out_dir else None
        self.num_queries, self.topn, self.max_radius = num_queries, topn, max_radius
        self.step, self.split = step, split
        self.written: Dict[str, Path] = {}
        self.data: dict = {}
        self.error: Optional[str] = None  # the last failure's message, None when the plots were made
        self._loaded_step: Optional[int] = None
        self.collector = CodeCollector(eval_cfg.threshold)

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.out_dir is not None or bool(_wandb_loggers(trainer))

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._loaded_step = None  # before Lightning restores a checkpoint of this fit/test call

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: Dict[str, Any]) -> None:
        # trainer.test(ckpt_path=...) restores the weights but not the step counter: keep the checkpoint's step.
        step = checkpoint.get("global_step")
        self._loaded_step = int(step) if step is not None else None

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self.collector.reset()

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active(trainer):
            self.collector.add(outputs, batch, dataloader_idx)

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        col = self.collector
        if not self._active(trainer) or not col.complete():
            col.reset()
            return
        (qc, ql), (dc, dl) = col.gathered(trainer, 0), col.gathered(trainer, 1)  # every rank takes part
        col.reset()
        if not trainer.is_global_zero:
            return
        self.error = None
        try:
            self._draw(trainer, pl_module, qc, ql, dc, dl)
        except Exception as exc:  # a picture is never worth a finished run's results
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("retrieval plots failed (%s); the run's metrics are not affected", self.error,
                        exc_info=log.isEnabledFor(logging.DEBUG))

    def _metrics(self, trainer, qc, ql, dc, dl) -> Dict[str, float]:
        """The test metrics the evaluation callback computed (``map``, ...), else computed here."""
        for cb in trainer.callbacks:
            if isinstance(cb, RetrievalEvaluation) and cb.last.get("test"):
                return {k.split("/", 1)[1]: v for k, v in cb.last["test"].items()}
        from ...metrics import retrieval_metrics
        from ...metrics.specs import options_from

        m = retrieval_metrics(qc, dc, ql, dl, ties=self.cfg.ties, empty_queries=self.cfg.empty_queries,
                              **options_from(lambda name: self.cfg.get(name)))
        return {k: float(v) for k, v in m.items() if isinstance(v, (int, float))}

    def _draw(self, trainer, pl_module, qc, ql, dc, dl) -> None:
        from ...files import write_text
        from ...plots.figures import (CURVES_FILE, curve_record, figure_to_image, make_figures, run_details,
                                      run_identity, save_figures)

        dm = getattr(trainer, "datamodule", None)
        run_cfg = self.run_cfg if self.run_cfg is not None else getattr(pl_module, "cfg", None)
        identity = run_identity(run_cfg) if run_cfg is not None else ""
        step = self.step if self.step is not None else (
            self._loaded_step if self._loaded_step is not None else trainer.global_step)
        metrics = self._metrics(trainer, qc, ql, dc, dl)
        details = run_details(self.split, step, metrics.get("map"))
        class_names = getattr(getattr(dm, "source", None), "class_names", None)
        q_img = image_getter(dm, getattr(dm, "query", None))
        d_img = image_getter(dm, getattr(dm, "database", None))
        out = make_figures(qc, dc, ql, dl, self.max_radius, self.num_queries, self.topn, q_img, d_img,
                           empty_queries=self.cfg.empty_queries, ties=self.cfg.ties, identity=identity,
                           class_names=class_names, details=details)
        figs, self.data = out["figures"], out["data"]
        try:
            if self.out_dir is not None:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                meta = {"split": self.split, "step": int(step), "metrics": metrics}
                if run_cfg is not None:
                    from omegaconf import OmegaConf

                    for key, path in (("dataset", "data.dataset"), ("method", "experiment"), ("bits", "model.bits"),
                                      ("seed", "seed")):
                        value = OmegaConf.select(run_cfg, path, default=None)
                        if value is not None:
                            meta[key] = value
                write_text(self.out_dir / CURVES_FILE, json.dumps(curve_record(self.data, **meta), indent=1))
            loggers = _wandb_loggers(trainer)
            if loggers:
                import wandb

                images = {f"test/plots/{name}": wandb.Image(figure_to_image(fig)) for name, fig in figs.items()}
                for lg in loggers:
                    lg.experiment.log({**images, "trainer/global_step": trainer.global_step})
            if self.out_dir is not None:
                self.written = save_figures(figs, self.out_dir, fmt=self.fmt, close=False)
        finally:
            import matplotlib.pyplot as plt

            for fig in figs.values():
                plt.close(fig)
        if self.written:
            pl_module.print(f"plots written to {self.out_dir}: {', '.join(p.name for p in self.written.values())}")
