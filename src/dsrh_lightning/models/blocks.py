"""Backbones as stages: a stem, then the blocks that partial fine-tuning trains from the top down.

``model.train_blocks=N`` trains the last ``N`` blocks of the backbone; the stem and the blocks below
are frozen: no gradients, and kept in eval mode (BatchNorm statistics and dropout fixed) through every
``train()`` / ``eval()`` switch (see :class:`~dsrh_lightning.models.network.HashingNetwork`).
What a block is, per backbone:

* ``small_cnn``: its 4 conv blocks, then the pooled FC layer (5 blocks, no stem);
* ``vgg16`` / ``vgg19`` / ``vgg19_bn``: the 5 conv stages (each ends at a max-pool), then the classifier
  (fc6, fc7; with ``hash_input=last_two`` their concatenation) (6 blocks, no stem);
* ``resnet18`` / ``resnet50``: ``layer1`` .. ``layer4`` (4 blocks; stem: conv1, bn1, relu, max-pool);
* ``efficientnet_lite0``: its 7 stages, then the head (1x1 conv 320 -> 1280, BatchNorm, pooling)
  (8 blocks; stem: conv_stem, bn1).

Running the stages in order gives the backbone's own ``forward`` (a test checks it for each backbone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Stage", "backbone_stages", "check_partial_cache", "frozen_stage_count", "run_stages", "LowerBackbone", "num_blocks"]


@dataclass
class Stage:
    """One stage: ``fn(x) -> y`` and the modules it uses (the ones frozen with it)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    modules: List[nn.Module] = field(default_factory=list)


def _seq(name: str, modules: Sequence[nn.Module]) -> Stage:
    mods = list(modules)

    def fn(x: torch.Tensor) -> torch.Tensor:
        for m in mods:
            x = m(x)
        return x

    return Stage(name, fn, mods)


def _small_cnn(net) -> List[Stage]:
    feats = list(net.features.children())
    per = 4  # conv, BatchNorm, ReLU, max-pool
    stages = [_seq("stem", [])]
    stages += [_seq(f"conv{i + 1}", feats[i * per:(i + 1) * per]) for i in range(len(feats) // per)]
    stages.append(_seq("fc", [net.pool, net.fc]))
    return stages


def _vgg_conv_stages(features: nn.Module) -> List[Stage]:
    stages, current = [], []
    for m in features.children():
        current.append(m)
        if isinstance(m, nn.MaxPool2d):
            stages.append(_seq(f"conv{len(stages) + 1}", current))
            current = []
    if current:
        stages.append(_seq(f"conv{len(stages) + 1}", current))
    return stages


def _vgg(net) -> List[Stage]:
    head = Stage("classifier", lambda x: net.classifier(torch.flatten(net.avgpool(x), 1)),
                 [net.avgpool, net.classifier])
    return [_seq("stem", [])] + _vgg_conv_stages(net.features) + [head]


def _vgg_last_two(net) -> List[Stage]:
    def head(x: torch.Tensor) -> torch.Tensor:
        h6 = net.fc6(torch.flatten(net.avgpool(x), 1))
        return torch.cat([h6, net.fc7(h6)], dim=1)

    return [_seq("stem", [])] + _vgg_conv_stages(net.features) + [
        Stage("classifier", head, [net.avgpool, net.fc6, net.fc7])]


def _resnet(net) -> List[Stage]:
    stages = [_seq("stem", [net.conv1, net.bn1, net.relu, net.maxpool])]
    stages += [_seq(f"layer{i}", [getattr(net, f"layer{i}")]) for i in (1, 2, 3)]
    stages.append(Stage("layer4", lambda x: net.fc(torch.flatten(net.avgpool(net.layer4(x)), 1)),
                        [net.layer4, net.avgpool, net.fc]))
    return stages


def _efficientnet(net) -> List[Stage]:
    def head(x: torch.Tensor) -> torch.Tensor:
        # timm's forward_head without its classifier (num_classes=0): pooling, then dropout while training.
        x = net.global_pool(net.bn2(net.conv_head(x)))
        if net.drop_rate > 0.0:
            x = F.dropout(x, p=net.drop_rate, training=net.training)
        return net.classifier(x)

    stages = [_seq("stem", [net.conv_stem, net.bn1])]
    stages += [_seq(f"stage{i + 1}", [b]) for i, b in enumerate(net.blocks.children())]
    stages.append(Stage("head", head, [net.conv_head, net.bn2, net.global_pool, net.classifier]))
    return stages


def backbone_stages(backbone: nn.Module) -> List[Stage]:
    """``[stem, block 1, ..., block B]`` of a backbone built by :func:`~.backbones.build_backbone`.
    The stem may be empty (identity); running all stages in order equals ``backbone(x)``."""
    kind = type(backbone).__name__  # by name: backbones.py builds on this module, not the reverse
    if kind == "SmallCNN":
        return _small_cnn(backbone)
    if kind == "VGGLastTwo":
        return _vgg_last_two(backbone)
    if hasattr(backbone, "layer4") and hasattr(backbone, "conv1"):
        return _resnet(backbone)
    if hasattr(backbone, "features") and hasattr(backbone, "classifier") and hasattr(backbone, "avgpool"):
        return _vgg(backbone)
    if hasattr(backbone, "conv_stem") and hasattr(backbone, "blocks"):
        return _efficientnet(backbone)
    raise ValueError(f"model.train_blocks: no block structure is defined for {type(backbone).__name__}")


def num_blocks(backbone: nn.Module) -> int:
    """B: the blocks of ``backbone`` (its stages less the stem)."""
    return len(backbone_stages(backbone)) - 1


def frozen_stage_count(backbone: nn.Module, train_blocks: int, key: str = "model.train_blocks") -> int:
    """How many leading stages are frozen when the last ``train_blocks`` blocks train:
    ``1 + B - N`` (stem + lower blocks); ``-1`` trains everything (0 frozen stages)."""
    from ..config import ConfigError

    b = num_blocks(backbone)
    if train_blocks == -1:
        return 0
    if not 0 <= train_blocks <= b:
        raise ConfigError(f"{key}={train_blocks}: {type(backbone).__name__} has {b} blocks; "
                          f"expected 0..{b}, or -1 (all train)")
    return 1 + b - train_blocks


def check_partial_cache(backbone: nn.Module, frozen: int, name: str, train_blocks: int) -> None:
    """Refuse a partial feature cache whose frozen part computes nothing (its cache would be the images)."""
    from ..config import ConfigError

    if not any(True for s in backbone_stages(backbone)[:frozen] for _ in s.modules):
        raise ConfigError(f"model.train_blocks={train_blocks} with data.cache_features=true: {name} has no frozen "
                          f"layers below its last {train_blocks} blocks, so there is nothing to cache; train fewer "
                          f"blocks, or set data.cache_features=false")


def run_stages(stages: Sequence[Stage], x: torch.Tensor) -> torch.Tensor:
    """Apply ``stages`` in order."""
    for s in stages:
        x = s.fn(x)
    return x


class LowerBackbone(nn.Module):
    """The frozen lower part of a backbone: ``images (b, 3, h, w) -> the input of stage ``stage```` (the
    output partial fine-tuning caches). Holds the whole backbone (its weights), runs only the lower stages."""

    def __init__(self, backbone: nn.Module, stage: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.stage = int(stage)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Stages are rebuilt per call (a few closures): stored ones would survive a deepcopy pointing at
        # the original modules.
        return run_stages(backbone_stages(self.backbone)[:self.stage], x)
