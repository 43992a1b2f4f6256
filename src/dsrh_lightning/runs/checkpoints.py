"""Checkpoints: the one home for reading, loading and checking them.

``read_checkpoint`` reads one safely, ``load_run`` rebuilds the trained module from it,
``open_resume`` / ``check_resume_compatible`` decide whether a run can continue from it.

``load_run`` is the ONE way to open a checkpoint written by ``dsrh train``.

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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from ..config import Config, ConfigError, normalise_overrides, to_dict, upgrade_legacy_config, validate
from ..errors import FileError

__all__ = ["Run", "CheckpointError", "check_resume_compatible", "incompatible_keys", "load_run",
           "newest_readable_checkpoint", "open_resume", "read_checkpoint"]


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
    from ..search.weights import weights_hash

    path = Path(checkpoint)
    ckpt = read_checkpoint(path)
    hp = dict(ckpt["hyper_parameters"])
    if isinstance(hp.get("config"), dict):
        hp["config"] = upgrade_legacy_config(hp["config"])  # older key names read as today's
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(Config), hp["config"])
    except Exception as exc:
        raise CheckpointError(path, f"the saved config does not match this version's schema ({exc})") from None
    cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(normalise_overrides(overrides)))
    validate(cfg)
    state = ckpt["state_dict"]
    module = None
    if build_module:
        from ..lightning.module import HashingModule

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


def newest_readable_checkpoint(folder: Path, exclude: Optional[Path] = None) -> Optional[Path]:
    """The most recently written ``*.ckpt`` in ``folder`` that loads, or None."""
    found = sorted((p for p in Path(folder).glob("*.ckpt") if p != exclude and not p.name.startswith(".")),
                   key=lambda p: p.stat().st_mtime, reverse=True)
    for p in found:
        try:
            read_checkpoint(p)
            return p
        except CheckpointError:
            continue
    return None


def open_resume(cfg: DictConfig, path: Path) -> Tuple[Path, Dict[str, Any]]:
    """Read the checkpoint to resume from: ``(path actually used, its contents)``.

    With ``resume=auto`` an unreadable ``last.ckpt`` falls back to the newest readable checkpoint
    beside it (said on stdout); with ``resume=PATH`` it is a ``ConfigError`` naming the file.
    """
    try:
        return path, read_checkpoint(path)
    except CheckpointError as exc:
        if cfg.resume != "auto":
            raise ConfigError(f"resume={cfg.resume}: {exc}") from None
        other = newest_readable_checkpoint(path.parent, exclude=path)
        if other is None:
            raise ConfigError(f"resume=auto: {exc}, and no other readable checkpoint in {path.parent}. "
                              "Give resume=PATH of a good checkpoint, or remove the folder to start over.") from None
        print(f"WARNING: resume=auto: {exc}; resuming from the newest readable checkpoint instead: {other}",
              flush=True)
        return other, read_checkpoint(other)


# Keys whose change makes a checkpoint unusable (weight shapes, the method, the meaning of the saved
# data-loader position). model.weights only picks the initialisation, which the checkpoint replaces.
_COMPAT_SECTIONS = ("model",)
_COMPAT_KEYS = ("loss.ranking", "data.dataset", "data.sampling", "data.cache_features", "data.feature_norm",
                "data.num_labels")
_COMPAT_IGNORE = ("model.weights",)


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: Dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _with_defaults(stored: Dict[str, Any]) -> Dict[str, Any]:
    """``stored`` (a saved config) over the schema's defaults: keys added since it was written get theirs."""
    def merge(base: Any, over: Any) -> Any:
        if isinstance(base, dict) and isinstance(over, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in over.items()}}
        return over

    return merge(to_dict(OmegaConf.structured(Config)), stored)


def incompatible_keys(cfg: DictConfig, stored: Dict[str, Any]) -> List[str]:
    """``key: checkpoint X, now Y`` for every key whose change makes a run saved with config ``stored``
    impossible to continue with ``cfg`` (see ``_COMPAT_*``); empty when it can continue."""
    # A key the checkpoint's version did not have yet (e.g. data.feature_norm) counts as today's default.
    old, new = _flat(_with_defaults(upgrade_legacy_config(stored))), _flat(to_dict(cfg))
    keys = sorted(k for k in set(old) | set(new)
                  if (k.split(".")[0] in _COMPAT_SECTIONS or k in _COMPAT_KEYS) and k not in _COMPAT_IGNORE)
    if new.get("data.sampling") == "auto" and old.get("data.sampling") in ("balanced", "random"):
        new["data.sampling"] = old["data.sampling"]  # what auto resolved to when the run started (same labels)
    return [f"{k}: checkpoint {old.get(k, '<unset>')!r}, now {new.get(k, '<unset>')!r}"
            for k in keys if old.get(k, "<unset>") != new.get(k, "<unset>")]


def check_resume_compatible(cfg: DictConfig, ckpt_path: Path, ckpt: Dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming every key that differs between ``cfg`` and the config stored in
    ``ckpt`` (the contents of ``ckpt_path``, from :func:`open_resume`) and makes resuming impossible
    (see ``_COMPAT_*``); nothing is written."""
    stored = (ckpt.get("hyper_parameters") or {}).get("config")
    if not isinstance(stored, dict):
        raise ConfigError(f"resume={cfg.resume}: {ckpt_path} stores no run configuration "
                          "(hyper_parameters.config); it was not written by dsrh train")
    diff = incompatible_keys(cfg, stored)
    if diff:
        raise ConfigError(f"resume={cfg.resume}: {ckpt_path} cannot continue with this configuration; "
                          f"differing keys: {'; '.join(diff)}. Use the checkpoint's values, or start a new run "
                          "(another name=, without resume). Nothing was changed.")
