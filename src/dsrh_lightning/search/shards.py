"""Sharded codes indexes: a folder with ``manifest.json`` and ``shard-00000.npz`` ... (numpy only).

The format is described in :mod:`.codes_file`. :func:`open_sharded` reads the manifest and checks
it; :class:`ShardedCodes` then reads one shard at a time (:meth:`ShardedCodes.blocks` yields only the
packed codes, so a search holds one shard's codes plus its results), looks up the ids and labels of
given items in the shards that hold them (:meth:`ShardedCodes.take`), or loads everything
(:meth:`ShardedCodes.load`). :func:`open_codes` opens a codes file or a sharded folder alike, and
:func:`read_index` reads either whole.

Writers: :func:`write_shard` (one shard, atomically), :func:`write_manifest` (last, atomically) and
:func:`write_sharded` (both, from in-memory codes).
"""

from __future__ import annotations

import json
import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..files import write_text
from .codes_file import FORMAT, VERSION, CodesFileError, CodesIndex, _resolve_id, check_labels, check_packed, \
    read_codes, write_codes

__all__ = ["SHARDED_FORMAT", "SHARDED_VERSION", "MANIFEST", "ShardInfo", "ShardedCodes", "shard_name",
           "open_sharded", "open_codes", "read_index", "write_shard", "write_manifest", "write_sharded", "is_sharded"]

SHARDED_FORMAT = "dsrh-codes-sharded"
SHARDED_VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"shard-\d{5,}\.npz")


def shard_name(number: int) -> str:
    """File name of shard ``number`` (``shard-00000.npz``)."""
    if isinstance(number, bool) or not isinstance(number, (int, np.integer)) or number < 0:
        raise ValueError(f"shard number must be a non-negative integer, got {number!r}")
    return f"shard-{int(number):05d}.npz"


def is_sharded(path) -> bool:
    """True when ``path`` is a folder (or its ``manifest.json``) rather than a codes file."""
    p = Path(path)
    return p.is_dir() or p.name == MANIFEST


@dataclass(frozen=True)
class ShardInfo:
    """One shard: its file, number of codes and the index number of its first code."""

    path: Path
    count: int
    offset: int


def _load_keys(path: Path, keys: Sequence[str]) -> dict:
    """Only ``keys`` (those present) of the .npz at ``path``; the other arrays are not read."""
    if not path.is_file():
        raise CodesFileError(path, "shard file not found; the index folder is incomplete (run the same "
                                   "`dsrh index` command again to finish it)")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in keys if k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError, KeyError, AttributeError) as exc:
        raise CodesFileError(path, f"cannot read shard as .npz ({type(exc).__name__}: {exc})") from None


class ShardedCodes:
    """A sharded index opened from its manifest; shards are read when needed."""

    def __init__(self, folder: Path, bits: int, shards: List[ShardInfo], checkpoint: str = "",
                 weights_hash: str = "", source: str = "", keep_codes: bool = False) -> None:
        self.folder = folder
        self.bits = bits
        self.shards = shards
        self.checkpoint = checkpoint
        self.weights_hash = weights_hash
        self.source = source
        #: Keep every shard's codes (checked once) in memory after the first pass, as one block; ids and
        #: labels are still read from the shards when asked for. For repeated searches of one index.
        self.keep_codes = keep_codes
        self._kept: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def __repr__(self) -> str:
        return f"ShardedCodes({str(self.folder)!r}, {len(self)} codes of {self.bits} bits in {len(self.shards)} shards)"

    def _check_shard(self, s: ShardInfo, data: dict) -> np.ndarray:
        for key in ("format", "packed", "bits"):
            if key not in data:
                raise CodesFileError(s.path, f"missing key {key!r}; not a codes file written by dsrh index")
        if str(data["format"]) != FORMAT or int(data.get("version", -1)) != VERSION:
            raise CodesFileError(s.path, f"not a {FORMAT} version {VERSION} file")
        packed = data["packed"]
        bits = check_packed(s.path, packed, data["bits"], data.get("checksum"))
        if bits != self.bits:
            raise CodesFileError(s.path, f"has {bits}-bit codes but {self.folder / MANIFEST} says {self.bits}")
        if len(packed) != s.count:
            raise CodesFileError(s.path, f"has {len(packed)} codes but {self.folder / MANIFEST} says {s.count}")
        if "weights_hash" in data and str(data["weights_hash"]) != self.weights_hash:
            raise CodesFileError(s.path, f"was written with weights {str(data['weights_hash'])!r}, the manifest "
                                         f"says {self.weights_hash!r}; all shards must come from one checkpoint")
        return packed

    def blocks(self) -> Iterator[Tuple[int, np.ndarray]]:
        """``(offset, packed)`` per shard in index order; ``packed`` is ``(count, ceil(bits/8))`` uint8.
        With ``keep_codes``, after the first complete pass: one block ``(0, every code)`` from memory."""
        if self._kept is not None:
            yield 0, self._kept
            return
        parts = []
        for s in self.shards:
            data = _load_keys(s.path, ("format", "version", "packed", "bits", "checksum", "weights_hash"))
            packed = self._check_shard(s, data)
            if self.keep_codes:
                parts.append(packed)
            yield s.offset, packed
        if self.keep_codes:
            self._kept = parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _shard_of(self, indices: np.ndarray) -> np.ndarray:
        offsets = np.asarray([s.offset for s in self.shards], dtype=np.int64)
        return np.searchsorted(offsets, indices, side="right") - 1

    def take(self, indices) -> Tuple[np.ndarray, Optional[np.ndarray]]:
        """Ids (resolved like :func:`~.codes_file.read_codes`) and labels (or None) of items ``indices``
        (any shape), reading only the shards that hold them."""
        idx = np.asarray(indices, dtype=np.int64)
        flat = idx.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= len(self)):
            raise IndexError(f"item numbers must be in [0, {len(self)}), got {flat.min()}..{flat.max()}")
        ids = np.empty(flat.shape, dtype=object)
        labels, seen = None, set()
        which = self._shard_of(flat)
        for sh in np.unique(which):
            s = self.shards[int(sh)]
            sel = np.flatnonzero(which == sh)
            data = _load_keys(s.path, ("ids", "labels"))
            if "ids" not in data:
                raise CodesFileError(s.path, "missing key 'ids'; not a codes file written by dsrh index")
            if data["ids"].ndim != 1 or len(data["ids"]) != s.count:
                raise CodesFileError(s.path, f"'ids' has shape {data['ids'].shape} but {self.folder / MANIFEST} "
                                             f"says {s.count} codes")
            local = flat[sel] - s.offset
            ids[sel] = [_resolve_id(str(i), s.path.parent) for i in data["ids"][local]]
            part_labels = check_labels(data["labels"], s.path, s.count) if "labels" in data else None
            seen.add(part_labels is not None)
            if len(seen) > 1:
                raise CodesFileError(s.path, "shards disagree: some have labels, some do not")
            if part_labels is not None:
                if labels is None:
                    labels = np.zeros((flat.size,) + part_labels.shape[1:], dtype=part_labels.dtype)
                if labels.shape[1:] != part_labels.shape[1:]:
                    raise CodesFileError(s.path, f"labels of shape {part_labels.shape[1:]} differ from other "
                                                 f"shards' {labels.shape[1:]}")
                labels[sel] = part_labels[local]
        ids_out = np.asarray(ids.tolist(), dtype=str).reshape(idx.shape) if flat.size else \
            np.empty(idx.shape, dtype=str)
        if labels is not None:
            labels = labels.reshape(idx.shape + labels.shape[1:])
        return ids_out, labels

    def packed_at(self, indices) -> np.ndarray:
        """Packed codes ``(len(indices), ceil(bits/8))`` of items ``indices``, from the shards that hold them."""
        flat = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.zeros((flat.size, (self.bits + 7) // 8), dtype=np.uint8)
        which = self._shard_of(flat)
        for sh in np.unique(which):
            s = self.shards[int(sh)]
            sel = np.flatnonzero(which == sh)
            packed = self._check_shard(s, _load_keys(s.path, ("format", "version", "packed", "bits", "checksum",
                                                                "weights_hash")))
            out[sel] = packed[flat[sel] - s.offset]
        return out

    def find(self, ids: Sequence[str]) -> dict:
        """``{id: item number}`` (first occurrence) for each of ``ids`` (absolute paths or
        ``<dataset>#<i>``) that is in the index; reads only the shards' ids."""
        wanted = [str(i) for i in ids]
        out: dict = {}
        for s in self.shards:
            raw = _load_keys(s.path, ("ids",)).get("ids")
            if raw is None:
                raise CodesFileError(s.path, "missing key 'ids'; not a codes file written by dsrh index")
            # a stored id is absolute or relative to the folder: compare both spellings, then resolve the hits
            spellings = {}
            for w in wanted:
                spellings[w] = w
                if Path(w).is_absolute():
                    spellings[os.path.relpath(w, s.path.parent)] = w
            for j in np.flatnonzero(np.isin(raw, list(spellings))):
                w = spellings[str(raw[j])]
                if w not in out and _resolve_id(str(raw[j]), s.path.parent) in (w, str(Path(w).resolve())):
                    out[w] = s.offset + int(j)
        return out

    def load(self, require_labels: bool = False) -> CodesIndex:
        """Every shard, checked, concatenated into one :class:`CodesIndex` (for evaluation)."""
        parts = []
        for s in self.shards:
            part = read_codes(s.path)
            self._check_shard(s, {"format": np.asarray(FORMAT), "version": np.asarray(VERSION),
                                  "packed": part.packed, "bits": np.asarray(part.bits),
                                  "weights_hash": np.asarray(part.weights_hash)})
            parts.append(part)
        with_labels = [p.labels is not None for p in parts]
        if any(with_labels) and not all(with_labels):
            bad = self.shards[with_labels.index(not with_labels[0])].path
            raise CodesFileError(bad, "shards disagree: some have labels, some do not")
        if require_labels and not with_labels[0]:
            raise CodesFileError(self.folder, "has no labels (index a split=... to keep them); evaluation needs "
                                              "labels")
        labels = None
        if with_labels[0]:
            shapes = {p.labels.shape[1:] for p in parts}
            if len(shapes) > 1:
                raise CodesFileError(self.folder, f"shards have labels of different shapes {sorted(shapes)}")
            labels = np.concatenate([p.labels for p in parts])
        return CodesIndex(np.concatenate([p.packed for p in parts]), self.bits,
                          np.concatenate([p.ids for p in parts]), labels, self.checkpoint, self.weights_hash,
                          self.source)


def open_sharded(path, keep_codes: bool = False) -> ShardedCodes:
    """Open the sharded index in folder ``path`` (or its ``manifest.json``) and check the manifest.

    ``keep_codes``: keep the codes in memory after the first pass over the shards (see
    :class:`ShardedCodes`); without it every pass reads the shards again and memory holds one shard."""
    p = Path(path)
    folder = p.parent if p.name == MANIFEST and not p.is_dir() else p
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise CodesFileError(folder, "folder not found (expected a sharded index: a folder with manifest.json)")
    if not mpath.is_file():
        shards = sorted(x.name for x in folder.glob("shard-*.npz"))
        hint = (f"it holds {len(shards)} shard file(s) but no manifest: the index is unfinished (run the same "
                "`dsrh index` command again to finish it)") if shards else \
            "expected a sharded index folder (manifest.json + shard-00000.npz ...) or a codes file"
        raise CodesFileError(folder, f"no {MANIFEST}; {hint}")
    try:
        m = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CodesFileError(mpath, f"cannot read as JSON ({type(exc).__name__}: {exc})") from None
    if not isinstance(m, dict) or m.get("format") != SHARDED_FORMAT:
        raise CodesFileError(mpath, f"not a {SHARDED_FORMAT} manifest (format "
                                    f"{m.get('format') if isinstance(m, dict) else type(m).__name__!r})")
    if m.get("version") != SHARDED_VERSION:
        raise CodesFileError(mpath, f"manifest version {m.get('version')!r} is not supported; this version "
                                    f"reads {SHARDED_VERSION}")
    bits, count, entries = m.get("bits"), m.get("count"), m.get("shards")
    if isinstance(bits, bool) or not isinstance(bits, int) or bits < 1:
        raise CodesFileError(mpath, f"'bits' must be a positive integer, got {bits!r}")
    if not isinstance(entries, list) or not entries:
        raise CodesFileError(mpath, f"'shards' must be a non-empty list, got {entries!r}")
    infos, offset = [], 0
    for n, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not SHARD_RE.fullmatch(e["file"]):
            raise CodesFileError(mpath, f"shard entry {n} must be {{'file': 'shard-NNNNN.npz', 'count': N}} "
                                        f"(a file name in the index folder), got {e!r}")
        c = e.get("count")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise CodesFileError(mpath, f"shard entry {n} ({e['file']}): 'count' must be a positive integer, "
                                        f"got {c!r}")
        infos.append(ShardInfo(folder / e["file"], c, offset))
        offset += c
    if len({i.path.name for i in infos}) != len(infos):
        raise CodesFileError(mpath, "a shard file is listed twice")
    if count != offset:
        raise CodesFileError(mpath, f"'count' is {count!r} but the shards hold {offset} codes")
    meta = {k: m.get(k, "") for k in ("checkpoint", "weights_hash", "source")}
    if not all(isinstance(v, str) for v in meta.values()):
        raise CodesFileError(mpath, f"'checkpoint', 'weights_hash' and 'source' must be strings, got {meta}")
    return ShardedCodes(folder, bits, infos, keep_codes=keep_codes, **meta)


def open_codes(path, keep_codes: bool = False) -> Union[CodesIndex, ShardedCodes]:
    """A codes file read whole (:class:`CodesIndex`) or a sharded folder opened (:class:`ShardedCodes`;
    ``keep_codes`` for repeated searches, see :func:`open_sharded`)."""
    return open_sharded(path, keep_codes=keep_codes) if is_sharded(path) else read_codes(path)


def read_index(path, require_labels: bool = False) -> CodesIndex:
    """A codes file or a sharded folder (every shard loaded) as one :class:`CodesIndex`."""
    if is_sharded(path):
        return open_sharded(path).load(require_labels=require_labels)
    return read_codes(path, require_labels=require_labels)


def write_shard(folder, number: int, codes, ids: Sequence[str], labels=None, checkpoint: str = "",
                weights_hash: str = "", source: str = "") -> Path:
    """Write shard ``number`` of an index in ``folder`` (a codes file, atomically); return its path."""
    path = Path(folder) / shard_name(number)
    write_codes(path, codes, ids, labels, checkpoint=checkpoint, weights_hash=weights_hash, source=source)
    return path


def write_manifest(folder, counts: Sequence[int], bits: int, checkpoint: str = "", weights_hash: str = "",
                   source: str = "") -> Path:
    """Write ``folder/manifest.json`` for shards ``0 .. len(counts)-1`` holding ``counts`` codes each,
    atomically. Call it after every shard is written: a folder without it is an unfinished index."""
    folder = Path(folder)
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 1:
        raise ValueError(f"counts must be a non-empty list of positive shard sizes, got {counts}")
    for n in range(len(counts)):
        if not (folder / shard_name(n)).is_file():
            raise FileNotFoundError(f"{folder / shard_name(n)}: shard not written; write every shard first")
    manifest = {"format": SHARDED_FORMAT, "version": SHARDED_VERSION, "bits": int(bits), "count": sum(counts),
                "shards": [{"file": shard_name(n), "count": c} for n, c in enumerate(counts)],
                "checkpoint": str(checkpoint), "weights_hash": str(weights_hash), "source": str(source)}
    path = folder / MANIFEST
    write_text(path, json.dumps(manifest, indent=1) + "\n")
    return path


def write_sharded(folder, codes, ids: Sequence[str], labels=None, shard_size: int = 1_000_000,
                  checkpoint: str = "", weights_hash: str = "", source: str = "") -> ShardedCodes:
    """Write ``(n, bits)`` {0,1} ``codes`` (with ids, labels) as a sharded index of ``shard_size`` codes
    per shard in ``folder`` (created; shard files of an earlier index there are replaced), and open it."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, (int, np.integer)) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    if hasattr(codes, "cpu"):
        codes = codes.cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or len(codes) == 0:
        raise ValueError(f"codes must be a non-empty 2-D (n, bits) matrix, got shape {codes.shape}")
    ids = list(ids)
    if len(ids) != len(codes):
        raise ValueError(f"{len(ids)} ids for {len(codes)} codes")
    if labels is not None:
        labels = check_labels(labels, "labels", len(codes))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / MANIFEST
    if old.exists():
        old.unlink()  # the folder is an unfinished index until the new manifest is written
    counts = []
    for n, s in enumerate(range(0, len(codes), shard_size)):
        e = s + shard_size
        write_shard(folder, n, codes[s:e], ids[s:e], None if labels is None else labels[s:e], checkpoint,
                    weights_hash, source)
        counts.append(len(codes[s:e]))
    for extra in folder.glob("shard-*.npz"):  # shards of an earlier, larger index
        if SHARD_RE.fullmatch(extra.name) and int(extra.name[6:-4]) >= len(counts):
            extra.unlink()
    write_manifest(folder, counts, codes.shape[1], checkpoint, weights_hash, source)
    return open_sharded(folder)
