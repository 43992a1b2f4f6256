"""Binary codes on disk: the ONE reader of ``dsrh index`` files and ``dsrh eval-codes`` inputs.

Codes file written by ``dsrh index`` (one ``.npz``, format ``dsrh-codes`` version 1):

* ``format`` ("dsrh-codes"), ``version`` (1)
* ``packed``: ``(n, ceil(bits/8))`` uint8, ``np.packbits`` of the {0,1} codes; the padding bits
  of the last byte are zero (a file with a 1 there is refused)
* ``bits``: the code length, an integer array (a float such as 12.7 is refused)
* ``checksum``: sha256 (hex) of ``bits`` and ``packed`` (see :func:`packed_checksum`), so an edited
  ``bits`` (12 -> 9 or 16 fits the same bytes) or code is refused; files without it are still read
* ``ids``: ``(n,)`` strings, an absolute image path or ``<dataset>#<source index>``
  (relative image paths are resolved against the codes file's folder on read)
* ``labels``: optional, ``(n,)`` class ids or ``(n, c)`` multi-hot
* ``checkpoint``: the checkpoint path the codes came from; ``weights_hash``: a short
  hash of its weights (search warns when the query checkpoint differs)
* ``source``: a description of what was encoded

Every codes file is written atomically (:func:`dsrh_lightning.files.atomic_write`): a failed write
leaves an existing file as it was.

Sharded index (a folder; read by :mod:`.shards`, written by ``dsrh index`` for large collections):

* ``manifest.json``: ``{"format": "dsrh-codes-sharded", "version": 1, "bits": B, "count": N,
  "shards": [{"file": "shard-00000.npz", "count": n0}, ...], "checkpoint": ..., "weights_hash": ...,
  "source": ...}``; written last, so a folder without it is an unfinished index
* ``shard-00000.npz``, ``shard-00001.npz``, ...: each a codes file as above with the manifest's
  ``bits``, ``checkpoint`` and ``weights_hash``, and all with labels or all without; the index's
  items are the shards' items in manifest order (item ``i`` of shard ``s`` is number
  ``sum(counts[:s]) + i``)

Plain codes files (any method; ``dsrh eval-codes``): ``codes`` ``(n, bits)`` in {0,1} or
{-1,+1} and ``labels``. :func:`read_codes` reads both (``shards.read_index`` also a sharded folder,
loaded whole); every problem is a :class:`CodesFileError` whose message starts with the file name.
Needs numpy only.
"""

from __future__ import annotations

import hashlib
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import FileError
from ..files import atomic_write

__all__ = ["FORMAT", "VERSION", "CodesIndex", "CodesFileError", "write_codes", "read_codes", "check_labels",
           "check_packed", "packed_checksum", "is_memory_id", "MEMORY_ID"]

FORMAT = "dsrh-codes"
VERSION = 1
REQUIRED_KEYS = ("format", "version", "packed", "bits", "ids", "checkpoint", "weights_hash")
EXPECTED = "a codes file written by `dsrh index`, or an .npz with arrays 'codes' and 'labels'"
#: Ids of images of an in-memory data set: ``<dataset>#<source index>``.
MEMORY_ID = re.compile(r"[\w.-]+#\d+")
# Class ids beyond this are not class ids (a float 1e20 would silently become a huge int64).
MAX_CLASS_ID = 2 ** 31 - 1


class CodesFileError(FileError):
    """A codes file is missing or malformed; ``str()`` is ``<file>: <message>``."""


@dataclass
class CodesIndex:
    """Codes of a database: packed bits plus what is needed to interpret them."""

    packed: np.ndarray
    bits: int
    ids: np.ndarray
    labels: Optional[np.ndarray] = None
    checkpoint: str = ""
    weights_hash: str = ""
    source: str = ""

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    def unpacked(self) -> np.ndarray:
        """``(n, bits)`` uint8 codes in {0, 1}."""
        return np.unpackbits(self.packed, axis=1, count=self.bits)

    def blocks(self):
        """``(offset, packed)`` pieces of the database, the same interface as a sharded index: one here."""
        yield 0, self.packed

    def take(self, indices):
        """``(ids, labels or None)`` of items ``indices`` (any shape)."""
        idx = np.asarray(indices, dtype=np.int64)
        return self.ids[idx], None if self.labels is None else self.labels[idx]

    def packed_at(self, indices) -> np.ndarray:
        """Packed codes ``(len(indices), ceil(bits/8))`` of items ``indices``."""
        return self.packed[np.asarray(indices, dtype=np.int64).reshape(-1)]

    def find(self, ids: Sequence[str]) -> dict:
        """``{id: item number}`` (first occurrence) for each of ``ids`` that is in the index."""
        wanted = [str(i) for i in ids]
        out: dict = {}
        if not wanted or not len(self.ids):
            return out
        for j in np.flatnonzero(np.isin(self.ids, wanted)):  # one pass over the ids, in index order
            out.setdefault(str(self.ids[j]), int(j))
        return out


def check_labels(labels, path, n: Optional[int] = None) -> np.ndarray:
    """Labels as integer class ids ``(n,)`` or 0/1 multi-hot ``(n, c)``; raises :class:`CodesFileError`."""
    arr = np.asarray(labels)
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise CodesFileError(path, f"'labels' must be integer class ids or 0/1 multi-hot, got dtype {arr.dtype} "
                                   f"(e.g. {arr.reshape(-1)[:3].tolist()}); map names to class ids first")
    if n is not None and (arr.ndim == 0 or arr.shape[0] != n):
        raise CodesFileError(path, f"'labels' has {arr.shape[0] if arr.ndim else 0} rows but there are {n} codes")
    if np.issubdtype(arr.dtype, np.floating) and arr.size:
        if not np.isfinite(arr).all():
            raise CodesFileError(path, "'labels' contains NaN or infinity; labels must be integer class ids "
                                       "or 0/1 multi-hot")
        if np.abs(arr).max() > MAX_CLASS_ID:
            raise CodesFileError(path, f"'labels' has value {np.abs(arr).max():g}, not a class id; labels must be "
                                       f"integer class ids (< 2**31) or 0/1 multi-hot")
    from ..relevance import validate_labels

    try:
        validate_labels(arr, "'labels'")
    except ValueError as exc:
        raise CodesFileError(path, str(exc)) from None
    if arr.ndim == 1 and arr.size and arr.max() > MAX_CLASS_ID:
        raise CodesFileError(path, f"'labels' has class id {arr.max()}; class ids must be < 2**31")
    return arr.astype(np.int64) if arr.ndim == 1 else arr


def write_codes(path, codes, ids: Sequence[str], labels=None, checkpoint: str = "", weights_hash: str = "",
                source: str = "") -> CodesIndex:
    """Write ``(n, bits)`` {0,1} ``codes`` with their ids (and labels) to ``path`` (.npz)."""
    if hasattr(codes, "cpu"):
        codes = codes.cpu().numpy()
    bits_arr = np.asarray(codes)
    if bits_arr.ndim != 2 or bits_arr.shape[1] == 0:
        raise ValueError(f"codes must be a 2-D (n, bits) matrix, got shape {bits_arr.shape}")
    if not np.isin(bits_arr, (0, 1)).all():
        raise ValueError("codes must be in {0, 1}")
    ids_arr = np.asarray([str(i) for i in ids], dtype=str)
    if len(ids_arr) != len(bits_arr):
        raise ValueError(f"{len(ids_arr)} ids for {len(bits_arr)} codes")
    index = CodesIndex(np.packbits(bits_arr.astype(np.uint8), axis=1), int(bits_arr.shape[1]), ids_arr,
                       None if labels is None else np.asarray(labels), str(checkpoint), str(weights_hash),
                       str(source))
    arrays = dict(format=np.asarray(FORMAT), version=np.asarray(VERSION), packed=index.packed,
                  bits=np.asarray(index.bits, dtype=np.int64),
                  checksum=np.asarray(packed_checksum(index.packed, index.bits)), ids=index.ids, checkpoint=np.asarray(index.checkpoint),
                  weights_hash=np.asarray(index.weights_hash), source=np.asarray(index.source))
    if index.labels is not None:
        if len(index.labels) != len(bits_arr):
            raise ValueError(f"{len(index.labels)} labels for {len(bits_arr)} codes")
        arrays["labels"] = index.labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as fh:
        _savez(fh, arrays)
    return index


def _savez(fh, arrays: dict) -> None:
    """``np.savez`` into the open file ``fh`` (uncompressed, any suffix), closing the archive even when a
    write fails half-way (np.savez leaves it to the garbage collector, which then writes to a closed file)."""
    with zipfile.ZipFile(fh, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, arr in arrays.items():
            with zf.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(arr), allow_pickle=False)


def packed_checksum(packed: np.ndarray, bits: int) -> str:
    """sha256 (hex) of the code length and the ``(n, ceil(bits/8))`` uint8 ``packed`` bytes."""
    h = hashlib.sha256(f"dsrh-codes bits={int(bits)} shape={packed.shape[0]},{packed.shape[1]}\n".encode())
    h.update(np.ascontiguousarray(packed, dtype=np.uint8).data)
    return h.hexdigest()


def check_packed(p, packed: np.ndarray, bits_value, checksum=None) -> int:
    """Validate ``packed`` codes and their ``bits`` entry; return ``bits`` as an int.

    ``bits_value`` must be a 0-d integer array, ``packed`` a 2-D uint8 ``(n, ceil(bits/8))``
    array whose padding bits are zero, and ``checksum`` (when stored) must match
    :func:`packed_checksum`. Raises :class:`CodesFileError` naming ``p``.
    """
    b = np.asarray(bits_value)
    if b.ndim != 0 or not np.issubdtype(b.dtype, np.integer):
        raise CodesFileError(p, f"'bits' must be one integer, got {b.tolist()!r} ({b.dtype}); the file was "
                                "edited or not written by dsrh index")
    bits = int(b)
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise CodesFileError(p, f"'packed' must be a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    if bits < 1 or packed.shape[1] != (bits + 7) // 8:
        raise CodesFileError(p, f"'packed' has {packed.shape[1]} bytes per code, which does not hold {bits} bits")
    pad = 8 * packed.shape[1] - bits
    if pad and len(packed):
        mask = np.uint8((1 << pad) - 1)  # np.packbits puts the first bit in the high bit: padding is low
        bad = np.flatnonzero(packed[:, -1] & mask)
        if len(bad):
            raise CodesFileError(p, f"code {bad[0]} (and {len(bad) - 1} more) has 1s in the padding after bit "
                                    f"{bits}; 'bits' was edited or the codes are longer than {bits} bits")
    if checksum is not None:
        stored = str(np.asarray(checksum))
        if stored != packed_checksum(packed, bits):
            raise CodesFileError(p, f"checksum does not match 'bits'={bits} and 'packed': the file was edited "
                                    "or damaged after dsrh index wrote it; index the images again")
    return bits


def _load_npz(p: Path) -> dict:
    if not p.is_file():
        raise CodesFileError(p, f"file not found (expected {EXPECTED})")
    if p.stat().st_size == 0:
        raise CodesFileError(p, f"file is empty (expected {EXPECTED})")
    try:
        z = np.load(p, allow_pickle=False)
        if not hasattr(z, "files"):  # a .npy array (np.load gives an ndarray, not an archive)
            raise CodesFileError(p, f"a single .npy array, not an .npz archive (expected {EXPECTED}; "
                                    "save with np.savez(path, codes=..., labels=...))")
        with z:
            return {k: z[k] for k in z.files}
    except CodesFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError) as exc:
        raise CodesFileError(p, f"cannot read as .npz ({type(exc).__name__}: {exc}); expected {EXPECTED}") from None


def _plain_codes(p: Path, data: dict, require_labels: bool) -> CodesIndex:
    codes = data["codes"]
    if codes.ndim != 2 or codes.shape[1] == 0:
        raise CodesFileError(p, f"'codes' must be 2-D (n, bits), got shape {codes.shape}")
    if codes.shape[0] == 0:
        raise CodesFileError(p, "'codes' is empty (0 rows); nothing to evaluate")
    if not (np.issubdtype(codes.dtype, np.number) or codes.dtype == bool):
        raise CodesFileError(p, f"'codes' must be numeric, got dtype {codes.dtype}")
    vals = set(np.unique(codes).tolist())
    if vals <= {0, 1}:
        bits01 = codes.astype(np.uint8)
    elif vals <= {-1, 1}:
        bits01 = (codes > 0).astype(np.uint8)
    else:
        raise CodesFileError(p, f"'codes' must be all {{0,1}} or all {{-1,+1}}; found values {sorted(vals)[:8]}")
    labels = data.get("labels")
    if labels is None and require_labels:
        raise CodesFileError(p, f"missing array 'labels'; found keys {sorted(data)}; expected 'codes' and 'labels'")
    if labels is not None:
        labels = check_labels(labels, p, len(codes))
    return CodesIndex(np.packbits(bits01, axis=1), int(codes.shape[1]),
                      np.asarray([str(i) for i in range(len(codes))]), labels, source="codes")


def read_codes(path, require_labels: bool = False) -> CodesIndex:
    """Read and validate a codes file (``dsrh index`` format or plain ``codes``/``labels``).
    :func:`dsrh_lightning.search.shards.read_index` reads a sharded folder as well.

    Raises :class:`CodesFileError` naming the file. With ``require_labels`` the
    file must carry labels (evaluation needs them).
    """
    p = Path(path)
    if p.is_dir() or p.name == "manifest.json":
        raise CodesFileError(p, "is a sharded index (a folder); read it with dsrh_lightning.search.read_index "
                                "or open_codes")
    data = _load_npz(p)
    if "format" not in data and "codes" in data:
        return _plain_codes(p, data, require_labels)
    fmt = str(data["format"]) if "format" in data else None
    if fmt != FORMAT:
        raise CodesFileError(p, f"unknown format {fmt!r} (expected {EXPECTED}; found keys {sorted(data)})")
    try:
        version = int(data.get("version"))
    except (TypeError, ValueError):
        raise CodesFileError(p, f"bad format version {data.get('version')!r}") from None
    if version != VERSION:
        newer = " (written by a newer dsrh-lightning)" if version > VERSION else ""
        raise CodesFileError(p, f"format version {version} is not supported{newer}; this version reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise CodesFileError(p, f"missing key(s) {missing}; found {sorted(data)}")
    packed, ids = data["packed"], data["ids"]
    if getattr(packed, "ndim", 0) == 2 and len(packed) == 0:
        raise CodesFileError(p, "the index is empty (0 codes); index at least one image")
    bits = check_packed(p, packed, data["bits"], data.get("checksum"))
    if ids.ndim != 1 or len(ids) != len(packed):
        raise CodesFileError(p, f"'ids' has shape {ids.shape} but there are {len(packed)} codes")
    labels = data.get("labels")
    if labels is not None:
        labels = check_labels(labels, p, len(packed))
    elif require_labels:
        raise CodesFileError(p, "has no labels (index a split=... to keep them); evaluation needs labels")
    ids = np.asarray([_resolve_id(str(i), p.parent) for i in ids])
    return CodesIndex(packed, bits, ids, labels, str(data["checkpoint"]), str(data["weights_hash"]),
                      str(data.get("source", "")))


def is_memory_id(item: str) -> bool:
    """True for ``<dataset>#<source index>`` ids (images of an in-memory data set, not files)."""
    return bool(MEMORY_ID.fullmatch(item))


def _resolve_id(item: str, base: Path) -> str:
    """Relative image paths are relative to the codes file; ``<dataset>#<i>`` ids stay as they are."""
    if item.startswith("/") or is_memory_id(item) or Path(item).is_absolute():
        return item
    return str((base / item).resolve())
