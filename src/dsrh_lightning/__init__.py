"""dsrh-lightning: deep supervised hashing for image retrieval on PyTorch Lightning."""

from importlib import import_module
from typing import Callable, Dict, List, Tuple

__version__ = "0.1.0"


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable, Callable]:
    """Module ``__getattr__`` and ``__dir__`` for a package whose names (``name -> submodule``) are imported on
    first use, so reading one light submodule does not import the heavy ones."""
    def __getattr__(name: str):
        if name in exports:
            return getattr(import_module(f"{package}.{exports[name]}"), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> List[str]:
        return sorted(set(vars(import_module(package))) | set(exports))

    return __getattr__, __dir__
