"""A tiny trained synthetic checkpoint shared by test modules (trained once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

_CACHE: dict = {}


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """A few training steps of the real synthetic config: ``(last checkpoint, config)``."""
    if "ckpt" not in _CACHE:
        from dsrh_lightning.config import load_config
        from dsrh_lightning.runs.train import train

        tmp = tmp_path_factory.mktemp("ckpt")
        cfg = load_config(["dataset=synthetic", f"output_dir={tmp}", "name=tiny", "data.synthetic_per_class=30",
                           "data.protocol.query_per_class=3", "data.protocol.train_per_class=15",
                           "data.protocol.val_per_class=3", "data.batch_size=8", "data.eval_batch_size=128",
                           "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.progress_bar=false",
                           "trainer.accelerator=cpu", "trainer.test_after_fit=false", "logger.name=none",
                           "data.split_dir=" + str(tmp / "splits")])
        results = train(cfg)
        _CACHE["ckpt"] = (Path(results["last_checkpoint"]), cfg)
    return _CACHE["ckpt"]
