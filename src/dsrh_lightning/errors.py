"""Error types shared across the package (no heavy imports)."""

from __future__ import annotations

__all__ = ["FileError"]


class FileError(ValueError):
    """An input file cannot be used; ``str()`` is ``<file>: <message>`` and ``path`` is the file."""

    def __init__(self, path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
