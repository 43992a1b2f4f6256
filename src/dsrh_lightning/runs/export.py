"""``dsrh export``: a trained run's image -> code function as one TorchScript or ONNX file, for serving.

The exported model takes ``images``: uint8 ``(n, s, s, 3)`` RGB at the run's input size ``s``
(:attr:`Hasher.image_size <dsrh_lightning.runs.hasher.Hasher.image_size>`, stored in the file's
metadata; resize other pictures to ``s x s`` first), normalises them as the run's evaluation did,
runs the network (with the backbone in front for runs trained on cached features) and returns
``codes``: packed uint8 ``(n, ceil(bits/8))`` in ``np.packbits`` order (the codes-file layout), and
``relaxed``: the float ``(n, bits)`` sigmoid outputs before the threshold. The batch size is dynamic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from ..errors import InputError
from ..files import atomic_write, tmp_path_for
from ..search.encode import encoder
from ..search.preprocess import EvalPreprocess
from .checkpoints import load_run

__all__ = ["ImageToCode", "export", "FORMATS"]

FORMATS = ("torchscript", "onnx")


class ImageToCode(nn.Module):
    """uint8 ``(n, s, s, 3)`` images -> ``(packed codes (n, ceil(bits/8)) uint8, relaxed (n, bits) float)``."""

    def __init__(self, net: nn.Module, bits: int, threshold: float, mean, std) -> None:
        super().__init__()
        self.net, self.bits, self.threshold = net, int(bits), float(threshold)
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        pad = (8 - bits % 8) % 8
        self.pad = pad
        self.register_buffer("weights", torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.int32))

    def forward(self, images: torch.Tensor):
        x = images.permute(0, 3, 1, 2).float()
        x = (x / 255.0 - self.mean) / self.std  # as BatchTransform's evaluation path
        relaxed = self.net(x).float()
        bits = (relaxed > self.threshold).to(torch.int32)
        if self.pad:
            bits = torch.cat([bits, torch.zeros(bits.shape[0], self.pad, dtype=torch.int32, device=bits.device)], 1)
        packed = (bits.reshape(bits.shape[0], -1, 8) * self.weights).sum(-1).to(torch.uint8)
        return packed, relaxed


class _Network(nn.Module):
    """Images -> relaxed codes with plain modules (a LightningModule cannot be traced outside a Trainer)."""

    def __init__(self, net: nn.Module, backbone=None) -> None:
        super().__init__()
        self.net, self.backbone = net, backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)
        return self.net(x)["codes"]


def build(ckpt: Path):
    """``(ImageToCode module, run, preprocess)`` of the checkpoint, on the CPU, in eval mode."""
    from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD

    run = load_run(ckpt)
    pre = EvalPreprocess(run.cfg)
    d = run.cfg.data
    mean, std = (tuple(d.mean) or IMAGENET_MEAN), (tuple(d.std) or IMAGENET_STD)
    full = encoder(run)  # the module, or (backbone, module) for a run trained on cached features
    net = _Network(run.module.net) if full is run.module else _Network(run.module.net, full[0])
    model = ImageToCode(net.eval(), int(run.cfg.model.bits), float(run.cfg.eval.threshold), mean, std)
    return model.eval(), run, pre


def export(ckpt: Path, out: Path, fmt: str, batch_size: int = 1) -> Dict[str, object]:
    """Write the image -> code model of ``ckpt`` to ``out`` (atomically) as ``fmt`` (torchscript | onnx)."""
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    out = Path(out)
    if out.is_dir():
        raise InputError(f"--out {out}: is a folder; give a file path (.pt or .onnx)")
    out.parent.mkdir(parents=True, exist_ok=True)
    model, run, pre = build(ckpt)
    s = pre.size
    example = torch.zeros(batch_size, s, s, 3, dtype=torch.uint8)
    meta = {"checkpoint": str(Path(ckpt).resolve()), "weights_hash": run.weights_hash, "bits": model.bits,
            "image_size": s, "threshold": model.threshold, "input": f"uint8 (n, {s}, {s}, 3) RGB",
            "outputs": "codes: uint8 (n, ceil(bits/8)) np.packbits order; relaxed: float (n, bits)"}
    with torch.no_grad():
        if fmt == "torchscript":
            traced = torch.jit.trace(model, example, check_trace=False)
            with atomic_write(out, "wb") as fh:
                torch.jit.save(traced, fh, _extra_files={"dsrh.json": json.dumps(meta)})
        else:
            tmp = tmp_path_for(out)
            try:
                torch.onnx.export(model, (example,), str(tmp), input_names=["images"],
                                  output_names=["codes", "relaxed"], dynamo=False, opset_version=17,
                                  dynamic_axes={"images": {0: "n"}, "codes": {0: "n"}, "relaxed": {0: "n"}})
                import onnx

                proto = onnx.load(str(tmp))
                for k, v in meta.items():
                    entry = proto.metadata_props.add()
                    entry.key, entry.value = f"dsrh.{k}", str(v)
                with atomic_write(out, "wb") as fh:
                    fh.write(proto.SerializeToString())
            finally:
                tmp.unlink(missing_ok=True)
    return {"input": meta["input"], "output": f"packed codes (n, {(model.bits + 7) // 8}) uint8", **meta}
