"""README "Use your codes": every example runs as written (bash blocks in order in one shell, then the
Python block), in a fresh folder holding a `photos/` folder of pictures of mixed sizes."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO


def _section_blocks() -> list:
    text = (REPO / "README.md").read_text()
    start = text.index("\n## Use your codes\n")
    end = text.index("\n## ", start + 5)
    return re.findall(r"```(bash|python)\n(.*?)```", text[start:end], flags=re.S)


@pytest.mark.slow
def test_use_your_codes_examples_run_as_written(tmp_path):
    from PIL import Image

    blocks = _section_blocks()
    kinds = [k for k, _ in blocks]
    assert kinds.count("bash") >= 3 and kinds.count("python") == 1
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for n, size in enumerate([(32, 32), (120, 80), (17, 45), (500, 300)]):
        Image.fromarray(rng.integers(0, 256, size + (3,), dtype=np.uint8)).save(photos / f"p{n}.png")
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"),
               PATH=f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ.get('PATH', '')}")
    script = "set -e\n" + "\n".join(body for kind, body in blocks if kind == "bash")
    proc = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "query: " in proc.stdout  # dsrh search printed its results
    for out in ("db_codes/manifest.json", "db_codes2/manifest.json", "photos.npz", "demo.pt", "demo.onnx"):
        assert (tmp_path / out).is_file(), out
    python = next(body for kind, body in blocks if kind == "python")
    proc = subprocess.run([sys.executable, "-c", python], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.strip(), "the example prints the first result"
