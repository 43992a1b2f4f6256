"""Experiment loggers: Weights & Biases by default (offline when no API key is configured)."""

from __future__ import annotations

import logging
import netrc
import os
from pathlib import Path
from typing import Union

from omegaconf import DictConfig

__all__ = ["build_logger", "quiet_lightning_tips", "wandb_key_available"]


class _DropTips(logging.Filter):
    """Drops Lightning's advertising tips ("💡 Tip: ... try installing litlogger"); every other record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).lstrip().startswith("💡 Tip")


def quiet_lightning_tips() -> None:
    """Keep Lightning's product tips off the terminal (its warnings and infos are untouched). Idempotent."""
    for name in ("pytorch_lightning.utilities.rank_zero", "lightning_fabric.utilities.rank_zero"):
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in log.filters):
            log.addFilter(_DropTips())


def wandb_key_available() -> bool:
    """True when W&B has credentials: ``WANDB_API_KEY`` or an ``api.wandb.ai`` netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        rc = netrc.netrc(os.environ.get("NETRC") or os.path.expanduser("~/.netrc"))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1].split("/")[0]
    return rc.authenticators(host) is not None


def resolve_wandb_mode(configured: str) -> str:
    """``logger.mode`` if set, else ``$WANDB_MODE``, else online with a key and offline without."""
    if configured:
        return configured
    env = os.environ.get("WANDB_MODE")
    if env:
        return env
    return "online" if wandb_key_available() else "offline"


def build_logger(cfg: DictConfig, run_dir: Path, run_name: str) -> Union[bool, object]:
    """The Lightning logger for ``cfg.logger.name`` (``False`` for ``none``)."""
    name = cfg.logger.name
    if name == "none":
        return False
    if name == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(str(run_dir), name="", version="csv")
    from pytorch_lightning.loggers import WandbLogger

    mode = resolve_wandb_mode(cfg.logger.mode)
    os.environ["WANDB_MODE"] = mode
    if mode == "offline":
        print(f"W&B: no API key configured (or WANDB_MODE=offline): logging offline under {run_dir}/wandb; "
              f"upload later with `wandb sync {run_dir}/wandb/offline-run-*`.", flush=True)
    run_id = (run_dir / "wandb_run_id").read_text().strip() if (run_dir / "wandb_run_id").is_file() else None
    logger = WandbLogger(project=cfg.logger.project, entity=cfg.logger.entity or None, name=run_name,
                         save_dir=str(run_dir), tags=list(cfg.logger.tags) or None, id=run_id,
                         resume="allow" if run_id else None, offline=(mode == "offline"))
    return logger
