"""Error types shared across the package (no heavy imports).

Every error a user can fix derives from :class:`DsrhError`; the command line prints those as
``error: <message>`` (exit code 2) and shows the traceback of anything else, because anything else
is a bug. The project's user errors:

* :class:`FileError` (``<file>: <message>``): :class:`~dsrh_lightning.runs.checkpoints.CheckpointError`,
  :class:`~dsrh_lightning.search.codes_file.CodesFileError`, :class:`~dsrh_lightning.files.WriteError`
  (disk full, a size limit, read-only: the previous file is kept);
* :class:`~dsrh_lightning.config.ConfigError` (and the sweep's ``SweepError``): a configuration key;
* :class:`~dsrh_lightning.data.sources.DataNotFoundError`: a data set is not where the config says;
* :class:`~dsrh_lightning.data.image_list.ImageListError` (and ``ImageDecodeError``): an image list;
* :class:`~dsrh_lightning.data.protocol.SplitError`: the protocol split cannot be made from the data;
* :class:`~dsrh_lightning.search.images.ImageInputError`: a query or index image;
* :class:`~dsrh_lightning.models.errors.WeightsUnavailableError`: pretrained weights cannot be had;
* :class:`DataError`: the data cannot be used as configured (a malformed data file, too few images for
  the sampling, a feature cache to rebuild);
* :class:`InputError`: a command-line argument;
* :class:`RunFolderError`: a run folder is in use, holds another run, or cannot be written;
* :class:`DivergedError`: training produced non-finite weights (the previous checkpoint is kept).

Each also derives from the built-in type callers caught before (``ValueError``, ``FileNotFoundError``,
``RuntimeError``, ``FloatingPointError``), so existing ``except`` clauses keep working.
"""

from __future__ import annotations

__all__ = ["DataError", "DsrhError", "DivergedError", "FileError", "InputError", "RunFolderError"]


class DsrhError(Exception):
    """Base of every error the user can fix; the command line prints it without a traceback."""


class FileError(DsrhError, ValueError):
    """An input file cannot be used; ``str()`` is ``<file>: <message>`` and ``path`` is the file."""

    def __init__(self, path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path


class DataError(DsrhError, ValueError):
    """The data cannot be used as configured; the message names the file or the shortfall and the fix."""


class InputError(DsrhError, ValueError):
    """A command-line argument or input value is out of range; the message names it."""


class RunFolderError(DsrhError):
    """A run folder cannot be used: in use by another process, holds another run, or not writable."""


class DivergedError(DsrhError, FloatingPointError):
    """Training produced non-finite weights; the message names the parameter and the checkpoint kept."""
