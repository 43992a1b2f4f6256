"""Retrieval pictures at test end: logged to W&B (only with a WandbLogger) and/or written as files
(png at 200 dpi, pdf or svg), titled with the run identity (dataset / experiment / bits).

Collects the binarised test codes itself (queries: loader 0, database: loader 1;
under DDP gathered from all ranks like :class:`RetrievalEvaluation`) and draws the
figures of :mod:`dsrh_lightning.plots` on rank 0. Does nothing when there is
neither a W&B logger nor an output folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pytorch_lightning as pl
from omegaconf import DictConfig

from .retrieval import CodeCollector

__all__ = ["RetrievalPlots"]


def _wandb_loggers(trainer: pl.Trainer) -> list:
    try:
        from pytorch_lightning.loggers import WandbLogger
    except ImportError:  # pragma: no cover
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]


def _raw_image_getter(dataset):
    """``position -> uint8 HWC image`` for an IndexedImageDataset (untransformed), else None."""
    images, indices = getattr(dataset, "images", None), getattr(dataset, "indices", None)
    if images is None or indices is None:
        return None
    return lambda i: np.asarray(images[int(indices[i])])


class RetrievalPlots(pl.Callback):
    def __init__(self, eval_cfg: DictConfig, out_dir: Optional[Path] = None, num_queries: int = 5,
                 topn: int = 10, max_radius: int = 3, fmt: str = "png", run_cfg: Optional[DictConfig] = None) -> None:
        self.cfg = eval_cfg
        self.fmt = fmt
        self.run_cfg = run_cfg  # the whole run config: titles name dataset / experiment / bits
        self.out_dir = Path(out_dir) if out_dir else None
        self.num_queries, self.topn, self.max_radius = num_queries, topn, max_radius
        self.written: dict = {}
        self.data: dict = {}
        self.collector = CodeCollector(eval_cfg.threshold)

    def _active(self, trainer: pl.Trainer) -> bool:
        return self.out_dir is not None or bool(_wandb_loggers(trainer))

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
        from ...plots.figures import figure_to_image, make_figures, run_identity, save_figures

        dm = getattr(trainer, "datamodule", None)
        run_cfg = self.run_cfg if self.run_cfg is not None else getattr(pl_module, "cfg", None)
        identity = run_identity(run_cfg) if run_cfg is not None else ""
        class_names = getattr(getattr(dm, "source", None), "class_names", None)
        q_img = _raw_image_getter(getattr(dm, "query", None))
        d_img = _raw_image_getter(getattr(dm, "database", None))
        out = make_figures(qc, dc, ql, dl, self.max_radius, self.num_queries, self.topn, q_img, d_img,
                           empty_queries=self.cfg.empty_queries, identity=identity, class_names=class_names)
        figs, self.data = out["figures"], out["data"]
        loggers = _wandb_loggers(trainer)
        if loggers:
            import wandb

            images = {f"test/plots/{name}": wandb.Image(figure_to_image(fig)) for name, fig in figs.items()}
            for lg in loggers:
                lg.experiment.log({**images, "trainer/global_step": trainer.global_step})
        self.written = save_figures(figs, self.out_dir, fmt=self.fmt) if self.out_dir is not None else {}
        if self.out_dir is None:
            import matplotlib.pyplot as plt

            for fig in figs.values():
                plt.close(fig)
        if self.written:
            pl_module.print(f"plots written to {self.out_dir}: {', '.join(p.name for p in self.written.values())}")
