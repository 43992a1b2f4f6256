"""Backbones: image -> shared feature vector.

The paper uses VGG-19; its shared features are the 4096-d output of fc7 (the
classifier without its last layer). ImageNet weights come from torchvision's
weights API; with no network they fail with a message that says what to do.
``small_cnn`` is a tiny network for fast CPU runs and tests.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .errors import WeightsUnavailableError

__all__ = ["WeightsUnavailableError", "build_backbone", "SmallCNN"]


class SmallCNN(nn.Module):
    """Four conv blocks + global pooling; ~0.3M parameters, for CPU smoke runs."""

    def __init__(self, width: int = 32, out_dim: int = 256) -> None:
        super().__init__()
        chans = [3, width, width * 2, width * 4, width * 4]
        blocks = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(chans[-1], out_dim), nn.ReLU(inplace=True))
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.features(x)))


def _torchvision_weights(name: str, weights: str):
    if weights == "none":
        return None
    from torchvision import models

    enum = {
        "vgg19": models.VGG19_Weights, "vgg19_bn": models.VGG19_BN_Weights, "vgg16": models.VGG16_Weights,
        "resnet18": models.ResNet18_Weights, "resnet50": models.ResNet50_Weights,
    }[name]
    return enum.IMAGENET1K_V1


def _load_torchvision(name: str, weights: str) -> nn.Module:
    from torchvision import models

    w = _torchvision_weights(name, weights)
    try:
        return getattr(models, name)(weights=w)
    except Exception as exc:  # URLError, HTTPError, socket errors, corrupt downloads
        if w is None:
            raise
        url = getattr(w, "url", "?")
        raise WeightsUnavailableError(
            f"could not load ImageNet weights for model.backbone={name} ({type(exc).__name__}: {exc}). "
            f"They are downloaded once from {url} into $TORCH_HOME/hub/checkpoints "
            f"(default ~/.cache/torch/hub/checkpoints). Either run once with network access, copy that file "
            f"there by hand, or train from scratch with model.weights=none (make train WEIGHTS=none)."
        ) from None


class VGGLastTwo(nn.Module):
    """VGG whose features are fc6 and fc7 outputs concatenated (Zhao et al.'s hash layer input)."""

    def __init__(self, vgg: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool = vgg.features, vgg.avgpool
        layers = list(vgg.classifier.children())  # fc6, relu, drop, fc7, relu, drop
        self.fc6, self.fc7 = nn.Sequential(*layers[:3]), nn.Sequential(*layers[3:6])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h6 = self.fc6(torch.flatten(self.avgpool(self.features(x)), 1))
        return torch.cat([h6, self.fc7(h6)], dim=1)


def build_backbone(name: str, weights: str = "none", hash_input: str = "last",
                   below_last_blocks: Optional[int] = None) -> Tuple[nn.Module, Optional[int]]:
    """Return ``(module, feature_dim)``: ``module(x (b,3,h,w)) -> (b, feature_dim)``.

    ``hash_input="last_two"`` (VGG only) returns fc6 and fc7 concatenated (8192-d).
    ``below_last_blocks=N`` (partial fine-tuning's feature cache) returns ``(lower, None)`` instead: the
    frozen part under the last ``N`` blocks (:class:`~.blocks.LowerBackbone`, images -> the input of
    those blocks).
    """
    if below_last_blocks is not None:
        from .blocks import LowerBackbone, check_partial_cache, frozen_stage_count

        full, _ = build_backbone(name, weights, hash_input)
        stage = frozen_stage_count(full, int(below_last_blocks))
        check_partial_cache(full, stage, name, int(below_last_blocks))
        return LowerBackbone(full, stage), None
    if name == "small_cnn":
        if weights != "none":
            raise WeightsUnavailableError("model.backbone=small_cnn has no pretrained weights; use model.weights=none")
        net = SmallCNN()
        return net, net.out_dim
    if name == "efficientnet_lite0":
        from .pretrained import efficientnet_lite0

        return efficientnet_lite0(weights)
    model = _load_torchvision(name, weights)
    if name.startswith("vgg") and hash_input == "last_two":
        return VGGLastTwo(model), 8192
    if name.startswith("vgg"):
        # Shared features = fc7 output (drop the 1000-way ImageNet layer).
        model.classifier = nn.Sequential(*list(model.classifier.children())[:-1])
        return model, 4096
    if name.startswith("resnet"):
        dim = model.fc.in_features
        model.fc = nn.Identity()
        return model, dim
    raise ValueError(f"model.backbone={name!r} is not supported")
