"""Errors of the models package (own module: backbones and pretrained both raise them, neither imports the other's module at import time)."""


from ..errors import DsrhError


class WeightsUnavailableError(DsrhError, RuntimeError):
    """Pretrained weights could not be loaded (usually: no network and no cached file)."""
