"""The hash stream of DSRH (Yao et al. 2016): divide-and-encode with bags."""

from __future__ import annotations

import math

import torch
from torch import nn

from .dropout import Dropout

__all__ = ["BagsHashHead"]

_ACTIVATIONS = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "none": nn.Identity}


class BagsHashHead(nn.Module):
    """features ``(b, d)`` -> relaxed codes ``(b, bits)`` in (0, 1).

    An FC layer maps the shared features to ``bag_size * bits`` units, split into
    ``bits`` bags of ``bag_size`` units; bag ``j`` is encoded to bit ``j`` by its
    own FC (``bag_size`` -> 1) and a sigmoid. Bit ``j`` therefore depends only on
    bag ``j``; the per-bag FCs are stored as one ``(bits, bag_size)`` weight.
    """

    def __init__(self, in_dim: int, bits: int, bag_size: int = 30, activation: str = "relu",
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.bits, self.bag_size = bits, bag_size
        self.fc = nn.Linear(in_dim, bits * bag_size)
        self.act = _ACTIVATIONS[activation]()
        self.drop = Dropout(dropout) if dropout else nn.Identity()
        self.bag_weight = nn.Parameter(torch.empty(bits, bag_size))
        self.bag_bias = nn.Parameter(torch.zeros(bits))
        bound = 1.0 / math.sqrt(bag_size)
        nn.init.uniform_(self.bag_weight, -bound, bound)

    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the bits, ``(b, bits)``."""
        z = self.drop(self.act(self.fc(x))).view(-1, self.bits, self.bag_size)
        return (z * self.bag_weight).sum(-1) + self.bag_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.pre_activation(x))
