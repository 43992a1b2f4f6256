"""The hashing network: shared backbone -> hash stream + classification stream."""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn

from .backbones import build_backbone
from .blocks import backbone_stages, check_partial_cache, frozen_stage_count, run_stages
from .heads import BagsHashHead

__all__ = ["FeatureStandardize", "HashingNetwork", "build_network", "trainable_blocks"]


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
    "logits" (b, classes) or None}``.

    ``frozen_stages``: the leading stages of the backbone (:mod:`.blocks`) that are frozen, -1 for the whole
    backbone, 0 for none. Frozen parts get no gradients and stay in eval mode whatever ``train()`` is
    called with, so their BatchNorm statistics and dropout never change. ``input_stage`` > 0: inputs may be
    the cached output of the first ``input_stage`` stages (partial fine-tuning on cached features), run
    through the remaining stages only; an image batch ``(b, 3, h, w)`` still runs through the whole
    backbone (no supported backbone has 3 channels between stages)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, bits: int, bag_size: int,
                 num_classes: Optional[int], bag_activation: str = "relu", dropout: float = 0.0,
                 shared_dim: int = 0, frozen_stages: int = 0, input_stage: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.frozen_stages, self.input_stage = int(frozen_stages), int(input_stage)
        # Optional trainable layer both streams read (model.shared_dim): the classification loss reaches
        # the hash stream's input through it even when the backbone is frozen or replaced by cached features.
        self.shared = nn.Sequential(nn.Linear(feature_dim, shared_dim), nn.ReLU()) if shared_dim else nn.Identity()
        dim = shared_dim or feature_dim
        self.hash_head = BagsHashHead(dim, bits, bag_size, bag_activation, dropout)
        self.classifier = nn.Linear(dim, num_classes) if num_classes else None
        for m in self.frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        self.train()

    def frozen_modules(self) -> List[nn.Module]:
        """The backbone modules that never train (the whole backbone, or those of the frozen stages)."""
        if self.frozen_stages == 0:
            return []
        stages = backbone_stages(self.backbone) if self.frozen_stages > 0 else []
        if self.frozen_stages < 0 or self.frozen_stages >= len(stages):
            return [self.backbone]
        return [m for s in stages[:self.frozen_stages] for m in s.modules]

    def train(self, mode: bool = True) -> "HashingNetwork":
        """``nn.Module.train``, except that frozen backbone parts stay in eval mode."""
        super().train(mode)
        for m in self.frozen_modules():
            m.train(False)
        return self

    def backbone_features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone output ``(b, d)`` of images, or of cached stage outputs (``input_stage`` > 0)."""
        if self.input_stage > 0 and not (x.ndim == 4 and x.shape[1] == 3):
            return run_stages(backbone_stages(self.backbone)[self.input_stage:], x)
        return self.backbone(x)

    def forward(self, x: torch.Tensor) -> Dict[str, Optional[torch.Tensor]]:
        features = self.shared(self.backbone_features(x))
        code_logits = self.hash_head.pre_activation(features)
        return {
            "features": features,
            "codes": torch.sigmoid(code_logits),
            "code_logits": code_logits,
            "logits": self.classifier(features) if self.classifier is not None else None,
        }


def trainable_blocks(model_cfg: DictConfig) -> int:
    """The backbone blocks that train: ``model.train_blocks`` (-1 = all), 0 with ``model.freeze_backbone``."""
    return 0 if model_cfg.freeze_backbone else int(model_cfg.get("train_blocks", -1))


def build_network(model_cfg: DictConfig, num_classes: int, feature_dim: Optional[int] = None,
                  standardize: bool = False, cache_features: bool = False,
                  seed: Optional[int] = None) -> HashingNetwork:
    """The network; with ``feature_dim`` (cached backbone features) the backbone is the identity, or a
    :class:`FeatureStandardize` with ``standardize`` (its statistics are set by the caller or a checkpoint).

    Otherwise the last ``model.train_blocks`` blocks of the backbone train and the rest is frozen
    (:func:`trainable_blocks`); with ``cache_features`` and 0 < ``train_blocks`` < all, the inputs are the
    cached output of the frozen part (``data.cache_features``), see :class:`HashingNetwork`; a randomly
    initialised backbone (``model.weights=none``) is then built right after ``torch.manual_seed(seed)``,
    as the cache's was, so the frozen part matches the cache."""
    frozen, input_stage = -1, 0
    if feature_dim:
        backbone, dim = (FeatureStandardize(int(feature_dim)) if standardize else nn.Identity()), int(feature_dim)
    else:
        n = trainable_blocks(model_cfg)
        if cache_features and n > 0 and model_cfg.weights == "none" and seed is not None:
            torch.manual_seed(int(seed))
        backbone, dim = build_backbone(model_cfg.backbone, model_cfg.weights, model_cfg.hash_input)
        frozen = frozen_stage_count(backbone, n) if n > 0 else (-1 if n == 0 else 0)  # -1: whole backbone
        if cache_features and n > 0:
            check_partial_cache(backbone, frozen, model_cfg.backbone, n)
            input_stage = frozen
    return HashingNetwork(backbone, dim, model_cfg.bits, model_cfg.bag_size,
                          num_classes if model_cfg.classifier else None,
                          model_cfg.bag_activation, model_cfg.dropout, int(model_cfg.shared_dim),
                          frozen_stages=frozen, input_stage=input_stage)

