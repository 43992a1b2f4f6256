"""Shared fixtures: real-config composition pointed at tmp_path, and the shared data folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """``$DSRH_SHARED_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("DSRH_SHARED_DATA")
    return Path(env) if env else (REPO.parent / "shared" / "data")


@pytest.fixture(autouse=True)
def _offline_wandb(monkeypatch, tmp_path):
    # Never touch a real W&B account from tests.
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.delenv("DSRH_DATA_DIR", raising=False)


@pytest.fixture
def tiny_overrides(tmp_path):
    """Overrides that turn the real synthetic config into a seconds-long CPU run in tmp_path."""
    return [
        "dataset=synthetic",
        f"output_dir={tmp_path / 'runs'}",
        "name=smoke",
        "data.synthetic_per_class=40",
        "data.protocol.query_per_class=5",
        "data.protocol.train_per_class=20",
        "data.protocol.val_per_class=5",
        "data.batch_size=16",
        "data.eval_batch_size=64",
        "trainer.max_steps=12",
        "trainer.val_check_interval=6",
        "trainer.progress_bar=false",
        "trainer.accelerator=cpu",
        "logger.name=csv",
    ]
