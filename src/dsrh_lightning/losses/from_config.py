"""The one adapter from the run config to a ranking method's keyword arguments and its miner.

A method's ``__init__`` names its settings. :func:`build_ranking_loss` gives it, by keyword:

* the values the run config offers every method (:data:`OFFERED`: ``bits``, ``num_classes``,
  ``margin``, ``margin_scaling``, ``average``, ``quant_weight``), those its signature names;
* the keys of ``LossConfig`` that feed one built-in method's argument under another name
  (:data:`METHOD_KEYS`, e.g. ``loss.dtsh_margin`` -> DTSH's ``alpha``);
* ``loss.params``, a mapping of the method's own settings: each key is checked against the signature
  (an unknown key is a ``ConfigError`` naming the key, the method and the keys it accepts).

So a new method with settings of its own needs its file, one registry line and one experiment YAML
(``loss.params: {...}``), and no change to the config schema. :func:`build_miner` picks the miner of a
triplet loss: explicit triplets (``data.sampling=triplets``) or ``loss.triplet_mining`` inside batches.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from omegaconf import OmegaConf

from ..config import ConfigError
from .miners import ExplicitTriplets, MultilevelTriplets
from .registry import get_ranking_loss
from .triplet import effective_margin, make_miner

__all__ = ["METHOD_KEYS", "OFFERED", "build_miner", "build_ranking_loss", "check_loss_config", "loss_kwargs"]

#: keyword argument -> where its value comes from (the run config offers these to every method).
OFFERED: Dict[str, str] = {
    "bits": "model.bits",
    "num_classes": "the data set's number of classes",
    "margin": "loss.margin",
    "margin_scaling": "loss.margin_scaling",
    "average": "loss.triplet_average",
    "quant_weight": "loss.quant_weight",
}

#: registry name -> {keyword argument: (LossConfig key, conversion)} for built-in methods whose settings
#: have their own LossConfig key (saved configs, sweeps and tuned files use these keys).
METHOD_KEYS: Dict[str, Dict[str, Tuple[str, Callable[[Any], Any]]]] = {
    "dtsh": {"alpha": ("dtsh_margin", float)},
    # hashnet_alpha = 0 means the paper's 10 / bits.
    "hashnet": {"alpha": ("hashnet_alpha", lambda v: float(v) or None),
                "gamma": ("hashnet_gamma", float), "power": ("hashnet_power", float)},
}


def _signature(cls: type) -> Tuple[Dict[str, inspect.Parameter], bool]:
    """The keyword parameters of ``cls.__init__`` and whether it takes ``**kwargs``."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind is p.VAR_KEYWORD for p in params)


def loss_kwargs(cfg, num_classes: int) -> Dict[str, Any]:
    """The keyword arguments ``cfg.loss.ranking``'s class is built with (checked against its signature)."""
    name = cfg.loss.ranking
    cls = get_ranking_loss(name)
    named, var_kw = _signature(cls)
    loss = cfg.loss
    # Read only the keys the method names (a config saved before a key existed still builds the others).
    readers = {"bits": lambda: int(cfg.model.bits), "num_classes": lambda: int(num_classes),
               "margin": lambda: float(loss.margin), "margin_scaling": lambda: str(loss.margin_scaling),
               "average": lambda: str(loss.triplet_average), "quant_weight": lambda: float(loss.quant_weight)}
    sources = dict(OFFERED)
    for kw, (key, convert) in METHOD_KEYS.get(name, {}).items():
        readers[kw] = lambda key=key, convert=convert: convert(loss[key])
        sources[kw] = f"loss.{key}"
    kwargs = {k: read() for k, read in readers.items() if k in named}
    params = loss.get("params") or {}
    own = sorted(k for k in named if k not in sources)
    for key, value in params.items():
        if key in sources and (key in named or var_kw):
            raise ConfigError(f"loss.params.{key}: loss.ranking={name} takes {key!r} from {sources[key]}; "
                              f"set that instead")
        if key not in named and not var_kw:
            raise ConfigError(f"loss.params.{key}: loss.ranking={name} ({cls.__name__}) has no setting {key!r}; "
                              f"it accepts loss.params keys: {', '.join(own) or '(none)'}")
        kwargs[key] = _plain(value)
    missing = [k for k, p in named.items() if p.default is inspect.Parameter.empty and k not in kwargs]
    if missing:
        raise ConfigError(f"loss.ranking={name} ({cls.__name__}) needs {', '.join(missing)}: set "
                          + ", ".join(f"loss.params.{k}" for k in missing))
    return kwargs


def _plain(value: Any) -> Any:
    """OmegaConf containers as plain lists / dicts (a loss never sees config objects)."""
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def build_ranking_loss(cfg, num_classes: int):
    """The ranking method of a run (``cfg.loss.ranking``) built from :func:`loss_kwargs`; a setting its
    ``__init__`` refuses becomes a ``ConfigError`` naming the method."""
    cls = get_ranking_loss(cfg.loss.ranking)
    kwargs = loss_kwargs(cfg, num_classes)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"loss.ranking={cfg.loss.ranking} ({cls.__name__}): {exc}") from None


def check_loss_config(cfg) -> None:
    """Before any data is read: ``loss.params`` fit the method's signature and the sampling its triplets
    (:func:`loss_kwargs`, :func:`build_miner`); the method's own value checks run when it is built."""
    cls = get_ranking_loss(cfg.loss.ranking)
    loss_kwargs(cfg, num_classes=1)
    build_miner(cfg, cls)


def build_miner(cfg, loss) -> Optional[Callable]:
    """The miner feeding ``loss`` (a ranking method, or its class) its triplets (None for a loss without triplets).

    Explicit triplets (``data.sampling=triplets``) -> :class:`~.miners.ExplicitTriplets`; in-batch sampling ->
    the ``loss.triplet_mining`` miner (capped by ``data.max_triplets``), or Zhao et al.'s multilevel triplets
    for a loss that needs them.
    """
    kind = getattr(loss, "triplets", None)
    if kind is None:
        return None
    # A config saved before loss.triplet_mining existed mined every triplet.
    name, mining = cfg.loss.ranking, cfg.loss.get("triplet_mining", "all")
    if cfg.data.sampling == "triplets":
        if kind == "multilevel":
            raise ConfigError(f"loss.ranking={name} mines multilevel triplets inside each batch: set "
                              "data.sampling=random (or balanced for single-label data)")
        if mining != "all":
            raise ConfigError(f"loss.triplet_mining={mining} mines triplets inside each batch: set "
                              "data.sampling=balanced (or random), or loss.triplet_mining=all for explicit triplets")
        return ExplicitTriplets()
    max_triplets = int(cfg.data.max_triplets)
    if kind == "multilevel":
        return MultilevelTriplets(max_triplets)
    margin = effective_margin(cfg.loss.margin, int(cfg.model.bits), cfg.loss.margin_scaling) \
        if mining == "semihard" else 0.0
    try:
        return make_miner(mining, margin, max_triplets)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
