"""`dsrh export`: the TorchScript and ONNX image -> code models give the checkpoint's codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _tiny_ckpt import tiny_ckpt  # noqa: F401  (fixture)
from dsrh_lightning import cli


def _pictures(hasher, n: int = 40) -> np.ndarray:
    """Data-set pictures (structured, so codes are not all alike) at the model's input size."""
    from dsrh_lightning.data.datamodule import load_source

    source, _ = load_source(hasher.cfg.data, hasher.cfg.seed)
    pics = source.images[:n]
    assert pics.shape[1:] == (hasher.image_size, hasher.image_size, 3)
    return pics


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_gives_the_checkpoints_codes(tiny_ckpt, tmp_path, capsys, fmt):
    from dsrh_lightning.runs.hasher import Hasher

    ckpt, _ = tiny_ckpt
    hasher = Hasher.from_checkpoint(ckpt)
    pics = _pictures(hasher)
    expected = hasher.encode(pics)
    relaxed = hasher.relaxed(pics).numpy()
    assert len(np.unique(expected, axis=0)) > 1
    out = tmp_path / ("model.pt" if fmt == "torchscript" else "model.onnx")
    assert cli.main(["export", "--ckpt", str(ckpt), "--format", fmt, "--out", str(out)]) == 0, capsys.readouterr().err
    if fmt == "torchscript":
        extra = {"dsrh.json": ""}
        model = torch.jit.load(str(out), _extra_files=extra)
        meta = json.loads(extra["dsrh.json"])
        with torch.no_grad():
            codes, rel = (t.numpy() for t in model(torch.from_numpy(pics)))
    else:
        ort = pytest.importorskip("onnxruntime")
        onnx = pytest.importorskip("onnx")
        meta = {p.key[5:]: p.value for p in onnx.load(str(out)).metadata_props if p.key.startswith("dsrh.")}
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        codes, rel = session.run(["codes", "relaxed"], {"images": pics})
    assert int(meta["bits"]) == hasher.bits and int(meta["image_size"]) == hasher.image_size
    assert meta["weights_hash"] == hasher.weights_hash
    np.testing.assert_allclose(rel, relaxed, rtol=0, atol=1e-5)
    assert codes.dtype == np.uint8 and codes.shape == expected.shape
    np.testing.assert_array_equal(codes, expected)
    np.testing.assert_array_equal(np.unpackbits(codes, axis=1, count=hasher.bits), hasher.encode(pics, unpacked=True))


def test_export_refuses_a_folder_and_an_unknown_format(tiny_ckpt, tmp_path, capsys):
    ckpt, _ = tiny_ckpt
    rc = cli.main(["export", "--ckpt", str(ckpt), "--format", "torchscript", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "is a folder" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli.main(["export", "--ckpt", str(ckpt), "--format", "tflite", "--out", str(tmp_path / "m")])
