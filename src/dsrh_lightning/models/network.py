"""The hashing network: shared backbone -> hash stream + classification stream."""

from __future__ import annotations

from typing import Dict, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from .backbones import build_backbone
from .heads import BagsHashHead

__all__ = ["FeatureStandardize", "HashingNetwork", "build_network"]


class FeatureStandardize(nn.Module):
    """``(b, d) -> (b, d)``: ``(x - mean) / std`` with fixed buffers (saved in checkpoints), the first layer
    of a network trained on cached features with ``data.feature_norm=standardize``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def set_statistics(self, mean, std) -> None:
        mean, std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if mean.shape != self.mean.shape or std.shape != self.std.shape:
            raise ValueError(f"feature statistics of shape {tuple(mean.shape)}/{tuple(std.shape)}, expected "
                             f"{tuple(self.mean.shape)} (the feature width)")
        if not bool((std > 0).all()):
            raise ValueError("feature statistics: every std must be > 0")
        self.mean.copy_(mean)
        self.std.copy_(std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class HashingNetwork(nn.Module):
    """``forward(x) -> {"features", "codes" (b, bits) in (0,1), "code_logits" (b, bits) (pre-sigmoid),
    "logits" (b, classes) or None}``."""

    def __init__(self, backbone: nn.Module, feature_dim: int, bits: int, bag_size: int,
                 num_classes: Optional[int], bag_activation: str = "relu", dropout: float = 0.0,
                 shared_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        # Optional trainable layer both streams read (model.shared_dim): the classification loss reaches
        # the hash stream's input through it even when the backbone is frozen or replaced by cached features.
        self.shared = nn.Sequential(nn.Linear(feature_dim, shared_dim), nn.ReLU()) if shared_dim else nn.Identity()
        dim = shared_dim or feature_dim
        self.hash_head = BagsHashHead(dim, bits, bag_size, bag_activation, dropout)
        self.classifier = nn.Linear(dim, num_classes) if num_classes else None

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        features = self.shared(self.backbone(x))
        code_logits = self.hash_head.pre_activation(features)
        return {
            "features": features,
            "codes": torch.sigmoid(code_logits),
            "code_logits": code_logits,
            "logits": self.classifier(features) if self.classifier is not None else None,
        }


def build_network(model_cfg: DictConfig, num_classes: int, feature_dim: Optional[int] = None,
                  standardize: bool = False) -> HashingNetwork:
    """The network; with ``feature_dim`` (cached backbone features) the backbone is the identity, or a
    :class:`FeatureStandardize` with ``standardize`` (its statistics are set by the caller or a checkpoint)."""
    if feature_dim:
        backbone, dim = (FeatureStandardize(int(feature_dim)) if standardize else nn.Identity()), int(feature_dim)
    else:
        backbone, dim = build_backbone(model_cfg.backbone, model_cfg.weights, model_cfg.hash_input)
    if model_cfg.freeze_backbone:
        for p in backbone.parameters():
            p.requires_grad_(False)
    return HashingNetwork(backbone, dim, model_cfg.bits, model_cfg.bag_size,
                          num_classes if model_cfg.classifier else None,
                          model_cfg.bag_activation, model_cfg.dropout, int(model_cfg.shared_dim))
