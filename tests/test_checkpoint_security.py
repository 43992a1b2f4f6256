"""Checkpoints are read once, with torch.load(weights_only=True), by run.load_run: a pickle that would
run code is refused (nothing runs, exit 2, the file is named); broken files exit 2 naming the file;
a run trained on cached features (data.cache_features) loads and indexes."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dsrh_lightning.models import build_backbone

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from conftest import REPO
from dsrh_lightning import cli


class _Evil:
    """Unpickling this calls os.system, which would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil_files(tmp_path: Path, marker: Path) -> dict:
    zipped = tmp_path / "evil_zip.ckpt"  # torch's zip format, payload inside the checkpoint dict
    torch.save({"state_dict": {}, "hyper_parameters": {"config": _Evil(marker)}}, zipped)
    legacy = tmp_path / "evil_pickle.ckpt"  # a bare pickle
    legacy.write_bytes(pickle.dumps(_Evil(marker)))
    return {"zip": zipped, "pickle": legacy}


def _commands(ckpt: Path, tmp_path: Path, image: Path, index: Path) -> dict:
    return {
        "eval": ["eval", "--ckpt", str(ckpt)],
        "index": ["index", "--ckpt", str(ckpt), "--out", str(tmp_path / "out.npz"), str(image)],
        "search": ["search", "--index", str(index), "--ckpt", str(ckpt), str(image)],
    }


@pytest.fixture
def inputs(tmp_path, tiny_ckpt):
    from PIL import Image

    from dsrh_lightning.search import write_codes

    ckpt, cfg = tiny_ckpt
    image = tmp_path / "q.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    index = tmp_path / "db.npz"
    write_codes(index, np.zeros((3, cfg.model.bits), np.uint8), ["a", "b", "c"])
    return ckpt, image, index


def test_malicious_checkpoint_runs_nothing(tmp_path, inputs, capsys):
    _, image, index = inputs
    marker = tmp_path / "PWNED"
    for kind, evil in _evil_files(tmp_path, marker).items():
        for name, argv in _commands(evil, tmp_path, image, index).items():
            rc = cli.main(argv)
            err = capsys.readouterr().err
            assert rc == 2, (kind, name, err)
            assert not marker.exists(), f"{kind} checkpoint ran code under dsrh {name}"
            assert str(evil) in err and "refused" in err and "Traceback" not in err, (kind, name, err)
    # The real command line too (console entry point through python -m), in a fresh process.
    evil = tmp_path / "evil_zip.ckpt"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    proc = subprocess.run([sys.executable, "-m", "dsrh_lightning.cli", "eval", "--ckpt", str(evil)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2 and not marker.exists()
    assert str(evil) in proc.stderr and "Traceback" not in proc.stderr


def test_broken_checkpoints_exit_2_naming_the_file(tmp_path, inputs, capsys):
    ckpt, image, index = inputs
    text = tmp_path / "text.ckpt"
    text.write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    notours = tmp_path / "notours.ckpt"
    torch.save({"weights": torch.zeros(3)}, notours)
    missing = tmp_path / "missing.ckpt"
    needles = {text: "not a readable checkpoint", empty: "empty", truncated: "not a readable checkpoint",
               notours: "not a dsrh-lightning checkpoint", missing: "not found"}
    for bad, needle in needles.items():
        for name, argv in _commands(bad, tmp_path, image, index).items():
            rc = cli.main(argv)
            err = capsys.readouterr().err
            assert rc == 2, (bad.name, name, err)
            assert str(bad) in err and needle in err and "Traceback" not in err, (bad.name, name, err)


def test_load_run_equals_lightning_load(tiny_ckpt):
    """load_run (weights_only, built by hand) gives the network Lightning's own loader gives."""
    from dsrh_lightning.lightning.module import HashingModule
    from dsrh_lightning.runs.checkpoints import load_run

    ckpt, cfg = tiny_ckpt
    run = load_run(ckpt, ["data.eval_batch_size=7"])
    assert run.cfg.data.eval_batch_size == 7 and run.feature_dim is None and not run.module.training
    ref = HashingModule.load_from_checkpoint(str(ckpt), map_location="cpu", weights_only=False).eval()
    ours, theirs = run.module.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=0)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(run.module(x), ref(x))


def test_no_unsafe_load_in_src():
    # Loads only: a save states weights_only=False to write the whole state (optimizer, loops, callbacks).
    hits = [f"{p}:{n}" for p in (REPO / "src").rglob("*.py")
            for n, line in enumerate(p.read_text().splitlines(), 1)
            if ("weights_only=False" in line and "save_checkpoint(" not in line) or "load_from_checkpoint(" in line]
    assert hits == [], hits


def test_feature_cached_run_indexes(tmp_path, capsys):
    """A run trained with data.cache_features=true (backbone = identity, saved feature_dim) loads and
    indexes both its data split (cached features) and image files (backbone rebuilt in front)."""
    from PIL import Image

    from dsrh_lightning.config import load_config
    from dsrh_lightning.data.datamodule import HashingDataModule
    from dsrh_lightning.runs.checkpoints import load_run
    from dsrh_lightning.search import read_codes
    from dsrh_lightning.runs.train import train

    cfg = load_config(["dataset=synthetic", f"output_dir={tmp_path}", "name=feat", "data.synthetic_per_class=20",
                       "data.protocol.query_per_class=2", "data.protocol.train_per_class=10",
                       "data.protocol.val_per_class=2", "data.batch_size=8", "data.eval_batch_size=64",
                       "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.progress_bar=false",
                       "trainer.accelerator=cpu", "trainer.test_after_fit=false", "logger.name=none",
                       "data.cache_features=true", f"data.feature_dir={tmp_path / 'features'}",
                       f"data.split_dir={tmp_path / 'splits'}"])
    ckpt = Path(train(cfg)["last_checkpoint"])
    run = load_run(ckpt)
    assert run.feature_dim and run.feature_dim > 0
    out = tmp_path / "db.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(out), "split=database", "--no-progress"]) == 0, \
        capsys.readouterr().err
    ix = read_codes(out)
    dm = HashingDataModule(run.cfg, backbone_factory=build_backbone)
    dm.setup("test")
    with torch.no_grad():
        feats = torch.stack([dm.database[i][0] for i in range(len(dm.database))])
        ref = (run.module(feats) > cfg.eval.threshold).to(torch.uint8).numpy()
    np.testing.assert_array_equal(ix.unpacked(), ref)
    # Image files go through the rebuilt backbone: a database image as PNG gets its split code back.
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    picks = [0, 3, 7]
    for p in picks:
        Image.fromarray(dm.source.images[dm.split.database[p]]).save(img_dir / f"{p}.png")
    out2 = tmp_path / "imgs.npz"
    assert cli.main(["index", "--ckpt", str(ckpt), "--out", str(out2), str(img_dir), "--no-progress"]) == 0, \
        capsys.readouterr().err
    fx = read_codes(out2)
    for n, p in enumerate(sorted(picks, key=lambda p: f"{p}.png")):
        assert Path(fx.ids[n]).name == f"{p}.png"
        np.testing.assert_array_equal(fx.unpacked()[n], ref[p])
