"""``load_run``: the ONE way to open a checkpoint written by ``dsrh train``.

Used by ``dsrh eval``, ``dsrh index``, ``dsrh search`` and the CPU benchmark. The file
is read once, with ``torch.load(..., weights_only=True)``: a checkpoint is data, never
code, so a pickle that would run something is refused (exit code 2 on the command line).
The module is rebuilt from the saved hyperparameters (``config``, ``num_classes``,
``multilabel``, ``feature_dim``) without downloading pretrained weights (the
checkpoint holds all of them), then the saved state dict is loaded into it.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from .errors import FileError

__all__ = ["Run", "CheckpointError", "load_run", "read_checkpoint"]


class CheckpointError(FileError):
    """A checkpoint cannot be used (missing, unsafe, truncated, not ours); ``str()`` is ``<file>: <message>``."""


@dataclass
class Run:
    """A trained run: the module (eval mode, CPU), its config (with overrides) and what else was saved."""

    path: Path
    module: Any
    cfg: Any
    hparams: Dict[str, Any]
    weights_hash: str

    @property
    def feature_dim(self) -> Optional[int]:
        """Set when the run was trained on cached backbone features (``data.cache_features``)."""
        return self.hparams.get("feature_dim")


def read_checkpoint(path) -> Dict[str, Any]:
    """The checkpoint's dict, loaded safely (tensors and plain containers only); raises :class:`CheckpointError`."""
    import torch

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(p, "checkpoint not found (give a .ckpt written by `dsrh train`)")
    if p.stat().st_size == 0:
        raise CheckpointError(p, "checkpoint file is empty (give a .ckpt written by `dsrh train`)")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        why = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise CheckpointError(p, "refused to load: the file holds objects other than tensors and plain data, which "
                                 f"could run code when unpickled ({why[:200]}). Only load checkpoints you trust; "
                                 "dsrh train writes checkpoints that load safely.") from None
    except Exception as exc:  # RuntimeError (truncated zip), EOFError, IndexError (text through the unpickler), ...
        msg = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(p, f"not a readable checkpoint ({type(exc).__name__}: {msg}); the file may be "
                                 "truncated or not written by `dsrh train`") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "config" not in ckpt.get("hyper_parameters", {}):
        keys = sorted(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(p, f"not a dsrh-lightning checkpoint (needs state_dict and hyper_parameters.config; "
                                 f"found {keys})")
    return ckpt


def load_run(checkpoint, overrides: Sequence[str] = (), build_module: bool = True) -> Run:
    """Open ``checkpoint`` once: ``Run(module, cfg, hparams, weights_hash)``.

    ``overrides`` (``key=value``, e.g. ``data.root=PATH``) change the returned config
    (data paths, evaluation settings), not the network. Raises :class:`CheckpointError`
    or :class:`~dsrh_lightning.config.ConfigError`.
    """
    from omegaconf import OmegaConf

    from .config import Config, normalise_overrides, validate
    from .search.weights import weights_hash

    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), hp["config"])
    except Exception as exc:
        raise CheckpointError(path, f"the saved config does not match this version's schema ({exc})") from None
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(normalise_overrides(overrides)))
    validate(cfg)
    state = ckpt["state_dict"]
    module = None
    if build_module:
        from .module import HashingModule

        config = OmegaConf.to_container(OmegaConf.create(hp["config"]), resolve=True)
        config["model"]["weights"] = "none"  # the checkpoint holds all weights: never download
        module = HashingModule(config, num_classes=hp["num_classes"], multilabel=hp.get("multilabel", False),
                               feature_dim=hp.get("feature_dim"))
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:
            raise CheckpointError(path, f"weights do not fit the saved model config: {str(exc)[:400]}") from None
        module.eval()
    return Run(path, module, cfg, hp, weights_hash(state))
