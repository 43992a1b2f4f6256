"""Ranking methods by config name (``loss.ranking``): the one place a method is registered.

Built-in entries are ``"module:Class"`` strings, imported only when a run builds its loss, so
reading the names (``dsrh --help``, config validation) does not import torch. A new method adds one
line to :data:`RANKING_LOSSES` (or calls :func:`register` / uses it as a class decorator); its keyword
arguments come from the run config through :func:`dsrh_lightning.losses.from_config.build_ranking_loss`.
"""

from __future__ import annotations

import importlib
from typing import Dict, Optional, Tuple, Union

__all__ = ["RANKING_LOSSES", "get_ranking_loss", "ranking_names", "register"]

RANKING_LOSSES: Dict[str, Union[str, type]] = {
    "triplet": "dsrh_lightning.losses.triplet:TripletRanking",            # DSRH, Yao et al. 2016
    "weighted": "dsrh_lightning.losses.semantic_ranking:WeightedRanking",  # Zhao et al. 2015
    "dpsh": "dsrh_lightning.losses.peers:DPSH",
    "dtsh": "dsrh_lightning.losses.peers:DTSH",
    "hashnet": "dsrh_lightning.losses.peers:HashNet",
    "csq": "dsrh_lightning.losses.peers:CSQ",
    "greedyhash": "dsrh_lightning.losses.greedyhash:GreedyHash",  # Su et al. 2018
    "orthohash": "dsrh_lightning.losses.orthohash:OrthoHash",     # Hoe et al. 2021
    "dsh": "dsrh_lightning.losses.dsh:DSH",                       # Liu et al. 2016
    "dhn": "dsrh_lightning.losses.dhn:DHN",                       # Zhu et al. 2016
}


def ranking_names() -> Tuple[str, ...]:
    """The allowed values of ``loss.ranking``."""
    return tuple(RANKING_LOSSES)


def register(name: str, cls: Optional[Union[str, type]] = None):
    """Register a ranking method under ``name``: ``register("toy", ToyLoss)``, or ``@register("toy")``
    on the class. ``cls`` may be a ``"module:Class"`` string. Re-registering a name replaces it."""
    if cls is not None:
        RANKING_LOSSES[name] = cls
        return cls

    def decorate(klass: type) -> type:
        RANKING_LOSSES[name] = klass
        return klass

    return decorate


def get_ranking_loss(name: str) -> type:
    """The class registered as ``name``; ``ValueError`` naming the choices for an unknown name."""
    entry = RANKING_LOSSES.get(name)
    if entry is None:
        raise ValueError(f"loss.ranking={name!r}: expected one of {', '.join(repr(n) for n in RANKING_LOSSES)}")
    if isinstance(entry, str):
        module, _, attr = entry.partition(":")
        entry = getattr(importlib.import_module(module), attr)
    entry.name = name
    return entry
