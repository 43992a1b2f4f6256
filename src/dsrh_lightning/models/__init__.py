"""Backbones, heads and the hashing network (plain nn.Modules)."""

from .backbones import WeightsUnavailableError, build_backbone
from .heads import BagsHashHead
from .network import HashingNetwork, build_network

__all__ = ["BagsHashHead", "HashingNetwork", "WeightsUnavailableError", "build_backbone", "build_network"]
