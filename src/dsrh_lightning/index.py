"""Binary codes on disk, encoding images with a checkpoint, and exact Hamming search.

Codes file (one ``.npz``, format ``dsrh-codes`` version 1):

* ``format`` ("dsrh-codes"), ``version`` (1)
* ``packed``: ``(n, ceil(bits/8))`` uint8, ``np.packbits`` of the {0,1} codes (zero padded)
* ``bits``: the code length
* ``ids``: ``(n,)`` strings, an image path or ``<dataset>#<source index>``
* ``labels``: optional, ``(n,)`` class ids or ``(n, c)`` multi-hot
* ``checkpoint``: the checkpoint path the codes came from; ``weights_hash``: a short
  hash of its weights (search warns when the query checkpoint differs)
* ``source``: a description of what was encoded

Search is exact and ranks by ``(Hamming distance, database index)``, the same
rule as :mod:`dsrh_lightning.metrics`. faiss binary indexes are used when
installed (flat; multi-index hashing for very large databases with a fallback
that keeps the result exact); otherwise the project's own engine.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .metrics import binarize, hamming_distance

__all__ = [
    "FORMAT", "VERSION", "IMAGE_EXTENSIONS", "CodesIndex", "IndexFileError", "ImageInputError",
    "write_codes", "read_codes", "weights_hash", "search", "search_torch", "search_faiss",
    "faiss_available", "find_images", "load_for_encoding", "encode",
]

FORMAT = "dsrh-codes"
VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
REQUIRED_KEYS = ("format", "version", "packed", "bits", "ids", "checkpoint", "weights_hash")
# faiss multi-index hashing pays off only for large databases of long codes.
MULTIHASH_MIN_DATABASE = 2_000_000
MULTIHASH_MIN_BITS = 32


class IndexFileError(ValueError):
    """A codes file is missing or malformed; ``str()`` is ``<file>: <message>``."""

    def __init__(self, path, message: str) -> None:
        super().__init__(f"{path}: {message}")


class ImageInputError(ValueError):
    """An image (or folder of images) given on the command line cannot be used."""


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


def write_codes(path, codes, ids: Sequence[str], labels=None, checkpoint: str = "", weights_hash: str = "",
                source: str = "") -> CodesIndex:
    """Write ``(n, bits)`` {0,1} ``codes`` with their ids (and labels) to ``path`` (.npz)."""
    bits_arr = np.asarray(codes.cpu() if isinstance(codes, torch.Tensor) else codes)
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
                  bits=np.asarray(index.bits), ids=index.ids, checkpoint=np.asarray(index.checkpoint),
                  weights_hash=np.asarray(index.weights_hash), source=np.asarray(index.source))
    if index.labels is not None:
        if len(index.labels) != len(bits_arr):
            raise ValueError(f"{len(index.labels)} labels for {len(bits_arr)} codes")
        arrays["labels"] = index.labels
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as fh:  # np.savez would append .npz to other suffixes
        np.savez(fh, **arrays)
    return index


def read_codes(path) -> CodesIndex:
    """Read and validate a codes file written by :func:`write_codes`; raises :class:`IndexFileError`."""
    p = Path(path)
    if not p.is_file():
        raise IndexFileError(p, "file not found (expected a codes file written by `dsrh index`)")
    try:
        with np.load(p, allow_pickle=False) as z:
            if not hasattr(z, "files"):
                raise IndexFileError(p, "not an .npz archive (expected a codes file written by `dsrh index`)")
            data = {k: z[k] for k in z.files}
    except IndexFileError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise IndexFileError(p, f"cannot read as .npz ({exc}); expected a codes file written by `dsrh index`")
    fmt = str(data["format"]) if "format" in data else None
    if fmt != FORMAT:
        raise IndexFileError(p, f"unknown format {fmt!r} (expected {FORMAT!r}; found keys {sorted(data)}); "
                                "write it with `dsrh index`")
    try:
        version = int(data.get("version"))
    except (TypeError, ValueError):
        raise IndexFileError(p, f"bad format version {data.get('version')!r}") from None
    if version != VERSION:
        newer = " (written by a newer dsrh-lightning)" if version > VERSION else ""
        raise IndexFileError(p, f"format version {version} is not supported{newer}; this version reads {VERSION}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise IndexFileError(p, f"missing key(s) {missing}; found {sorted(data)}")
    packed, bits, ids = data["packed"], int(data["bits"]), data["ids"]
    if packed.dtype != np.uint8 or packed.ndim != 2:
        raise IndexFileError(p, f"'packed' must be a 2-D uint8 array, got {packed.dtype} {packed.shape}")
    if bits < 1 or packed.shape[1] != (bits + 7) // 8:
        raise IndexFileError(p, f"'packed' has {packed.shape[1]} bytes per code, which does not hold {bits} bits")
    if ids.ndim != 1 or len(ids) != len(packed):
        raise IndexFileError(p, f"'ids' has shape {ids.shape} but there are {len(packed)} codes")
    labels = data.get("labels")
    if labels is not None and len(labels) != len(packed):
        raise IndexFileError(p, f"'labels' has {len(labels)} rows but there are {len(packed)} codes")
    return CodesIndex(packed, bits, ids, labels, str(data["checkpoint"]), str(data["weights_hash"]),
                      str(data.get("source", "")))


def weights_hash(state_dict) -> str:
    """A short (16 hex digit) SHA-256 of a state dict: names, dtypes, shapes and values."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name]
        if not isinstance(t, torch.Tensor):
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- search


def _check_k(k: int, nd: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    return int(min(k, nd))


def search_torch(q_bits, db_bits, k: int, db_chunk: int = 1 << 16) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` by ``(Hamming distance, database index)`` with the project's engine.

    Args:
        q_bits: ``(nq, bits)`` {0,1} queries; db_bits: ``(nd, bits)`` {0,1} database.

    Returns:
        ``(distances, indices)``, both ``(nq, min(k, nd))`` int64, best first.
    """
    q = torch.as_tensor(np.asarray(q_bits, dtype=np.uint8))
    db = torch.as_tensor(np.asarray(db_bits, dtype=np.uint8))
    nd = db.shape[0]
    k = _check_k(k, nd)
    best = torch.empty(q.shape[0], 0, dtype=torch.int64)
    for d0 in range(0, nd, db_chunk):
        dist = hamming_distance(q, db[d0:d0 + db_chunk]).to(torch.int64)
        # a unique key per item makes top-k independent of the selection algorithm
        keys = dist * nd + torch.arange(d0, d0 + dist.shape[1], dtype=torch.int64)
        cand = torch.cat([best, keys], 1)
        best = torch.topk(cand, min(k, cand.shape[1]), dim=1, largest=False, sorted=True).values
    return (best // nd).numpy(), (best % nd).numpy()


def faiss_available() -> bool:
    import logging

    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # it logs every CPU-feature probe
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _stable_from_range(lims, dist, idx, nq: int, k: int) -> Tuple[np.ndarray, np.ndarray]:
    out_d = np.empty((nq, k), dtype=np.int64)
    out_i = np.empty((nq, k), dtype=np.int64)
    for r in range(nq):
        d, i = dist[lims[r]:lims[r + 1]].astype(np.int64), idx[lims[r]:lims[r + 1]].astype(np.int64)
        order = np.lexsort((i, d))[:k]
        if len(order) < k:  # cannot happen for an exact range at the k-th distance
            raise RuntimeError(f"faiss range search returned {len(order)} < {k} items for query {r}")
        out_d[r], out_i[r] = d[order], i[order]
    return out_d, out_i


def _range_into(index, q_packed, rows, t: int, k: int, out_d, out_i, rows_per_call: int = 64) -> None:
    """Every item within distance ``t`` of each query in ``rows`` (a range search is strict:
    ``distance < t + 1``), sorted by (distance, index), first ``k`` written to ``out_*``.
    Queries go in small groups so that large tie groups stay bounded in memory."""
    for r0 in range(0, len(rows), rows_per_call):
        rr = rows[r0:r0 + rows_per_call]
        lims, dist, idx = index.range_search(q_packed[rr], t + 1)
        out_d[rr], out_i[rr] = _stable_from_range(lims, dist, idx, len(rr), k)


def search_faiss(q_bits, db_packed: np.ndarray, bits: int, k: int, multihash: Optional[bool] = None,
                 nhash: Optional[int] = None, nflip: int = 1, stats: Optional[dict] = None
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """Exact top ``k`` by ``(Hamming distance, database index)`` with faiss binary indexes.

    faiss's k-NN search may order ties differently and cut a tie group at the k-th
    distance anywhere, so it only finds the k-th distance ``t``; a range search then
    returns every item at distance ``<= t`` and they are sorted by ``(distance, index)``.

    With ``multihash`` (default: for databases of at least ``MULTIHASH_MIN_DATABASE``
    codes of ``MULTIHASH_MIN_BITS`` bits or more), ``IndexBinaryMultiHash`` with
    ``nhash`` tables and ``nflip`` flips finds every item within distance
    ``R = nhash * (nflip + 1) - 1`` (pigeonhole). A query whose k-th candidate lies
    within ``R`` is exact that way; the others are searched with the flat index.
    ``stats``, when given, receives the number of queries each index answered.
    """
    faiss_available()
    import faiss

    q_packed = np.ascontiguousarray(np.packbits(np.asarray(q_bits, dtype=np.uint8), axis=1))
    db_packed = np.ascontiguousarray(db_packed, dtype=np.uint8)
    if q_packed.shape[1] != db_packed.shape[1] or np.asarray(q_bits).shape[1] != bits:
        raise ValueError(f"bit widths differ: queries have {np.asarray(q_bits).shape[1]} bits, the database {bits}")
    nq, nd = q_packed.shape[0], db_packed.shape[0]
    k = _check_k(k, nd)
    d = 8 * db_packed.shape[1]  # zero padding bits add no distance
    if multihash is None:
        multihash = nd >= MULTIHASH_MIN_DATABASE and bits >= MULTIHASH_MIN_BITS
    out_d = np.empty((nq, k), dtype=np.int64)
    out_i = np.empty((nq, k), dtype=np.int64)
    todo = np.arange(nq)
    if multihash:
        nhash = nhash or max(1, bits // 16)
        b = bits // nhash
        if b < 1:
            raise ValueError(f"nhash={nhash} is larger than the {bits} bits")
        mih = faiss.IndexBinaryMultiHash(d, nhash, b)
        mih.nflip = nflip
        mih.add(db_packed)
        guaranteed = nhash * (nflip + 1) - 1
        D, _ = mih.search(q_packed, k)
        kth = D[:, k - 1].astype(np.int64)
        ok = (kth >= 0) & (kth <= guaranteed)  # -1: fewer than k candidates found
        if ok.any():
            sel = np.flatnonzero(ok)
            # one radius per call; group queries by their k-th distance
            for t in np.unique(kth[sel]):
                _range_into(mih, q_packed, sel[kth[sel] == t], int(t), k, out_d, out_i)
        todo = np.flatnonzero(~ok)
    if stats is not None:
        stats.update(multihash_queries=int(nq - len(todo)), flat_queries=int(len(todo)))
    if len(todo):
        flat = faiss.IndexBinaryFlat(d)
        flat.add(db_packed)
        D, _ = flat.search(q_packed[todo], k)
        kth = D[:, k - 1].astype(np.int64)
        for t in np.unique(kth):
            _range_into(flat, q_packed, todo[kth == t], int(t), k, out_d, out_i)
    return out_d, out_i


def search(q_bits, index: CodesIndex, k: int = 10, engine: str = "auto") -> Tuple[np.ndarray, np.ndarray, str]:
    """Top ``k`` of ``index`` for each query: ``(distances, indices, engine used)``."""
    if engine not in ("auto", "faiss", "torch"):
        raise ValueError(f"engine must be auto, faiss or torch, got {engine!r}")
    q_bits = np.asarray(q_bits, dtype=np.uint8)
    if q_bits.ndim != 2 or q_bits.shape[1] != index.bits:
        raise ValueError(f"bit widths differ: queries have {q_bits.shape[-1]} bits, the index has {index.bits}")
    if engine == "faiss" and not faiss_available():
        raise ValueError("--engine faiss: faiss is not installed (pip install faiss-cpu), use --engine torch")
    if engine == "auto":
        engine = "faiss" if faiss_available() else "torch"
    if engine == "faiss":
        d, i = search_faiss(q_bits, index.packed, index.bits, k)
    else:
        d, i = search_torch(q_bits, index.unpacked(), k)
    return d, i, engine


# -------------------------------------------------------------------------------------------- encoding


def find_images(inputs: Iterable[str]) -> List[Path]:
    """Image files named in ``inputs``: files as given, folders searched recursively (sorted)."""
    found: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
            if not files:
                raise ImageInputError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under folder {p}")
            found.extend(files)
        elif p.is_file():
            found.append(p)
        else:
            raise ImageInputError(f"{p}: no such image file or folder")
    if not found:
        raise ImageInputError("no images given")
    return found


class _ImagePaths(torch.utils.data.Dataset):
    def __init__(self, paths: Sequence[Path], transform) -> None:
        self.paths, self.transform = list(paths), transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.paths[i]) as img:
                arr = np.array(img.convert("RGB"))
        except Exception as exc:
            raise ImageInputError(f"cannot read image {self.paths[i]}: {type(exc).__name__}: {exc}") from None
        return self.transform(arr), 0, i


def native_image_size(cfg) -> Optional[int]:
    """Side of the training images for in-memory data sets, None for image files."""
    d = cfg.data
    if d.dataset == "synthetic":
        return int(d.synthetic_image_size)
    if d.dataset == "cifar10":
        return 32
    return None


def eval_transform(cfg):
    """The evaluation transform the checkpoint's model was validated with."""
    from .data.transforms import evaluation_transform

    return evaluation_transform(cfg.data, cfg.model.weights, native_image_size(cfg))[1]


def load_for_encoding(ckpt: Path, overrides: Sequence[str] = ()):
    """``(module, cfg, weights_hash)`` of a checkpoint; the network is rebuilt without downloading weights."""
    from omegaconf import OmegaConf

    from .evaluate import config_from_checkpoint
    from .module import HashingModule

    cfg, hp = config_from_checkpoint(Path(ckpt), overrides)
    ckpt_data = torch.load(ckpt, map_location="cpu", weights_only=False)
    config = OmegaConf.to_container(OmegaConf.create(hp["config"]), resolve=True)
    config["model"]["weights"] = "none"  # the checkpoint holds all weights
    module = HashingModule(config, num_classes=hp["num_classes"], multilabel=hp.get("multilabel", False))
    state = ckpt_data["state_dict"]
    module.load_state_dict(state)
    module.eval()
    return module, cfg, weights_hash(state)


@torch.no_grad()
def encode(module, dataset, threshold: float, batch_size: int = 256, num_workers: int = 0,
           progress: bool = True, desc: str = "encoding") -> np.ndarray:
    """Binary codes ``(n, bits)`` uint8 of every item of ``dataset`` (items ``(image, ...)``)."""
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    device = next(module.parameters()).device
    out = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        out.append(binarize(module(batch[0].to(device)).float(), threshold).cpu())
    return torch.cat(out).numpy()


def image_dataset(paths: Sequence[Path], cfg) -> torch.utils.data.Dataset:
    return _ImagePaths(paths, eval_transform(cfg))


def split_dataset(cfg, split: str):
    """``(dataset, ids, labels)`` of ``split`` (database | query | train) of the configured data set."""
    from .data.datamodule import load_source, make_split
    from .data.datasets import IndexedImageDataset
    from .data.image_list import ImageFiles

    if split not in ("database", "query", "train"):
        raise ValueError(f"split={split}: expected split=database, split=query or split=train")
    source, partition = load_source(cfg.data, cfg.seed, download=False)
    sp = make_split(source, partition, cfg.data)
    positions = np.asarray(getattr(sp, split), dtype=np.int64)
    ds = IndexedImageDataset(source.images, source.labels, positions, eval_transform(cfg))
    if isinstance(source.images, ImageFiles):
        ids = [source.images.paths[j] for j in positions]
    else:
        ids = [f"{source.name}#{j}" for j in positions]
    return ds, ids, np.asarray(source.labels)[positions]


# ------------------------------------------------------------------------------------- command line


def build_index_parser(p) -> None:
    p.add_argument("--ckpt", required=True, help="checkpoint written by dsrh train")
    p.add_argument("--out", required=True, help="codes file to write (.npz)")
    p.add_argument("data", nargs="+", metavar="DATA",
                   help="split=database|query|train of the checkpoint's data set (key=value overrides such as "
                        "data.root=PATH may follow), or image files / folders (searched recursively)")
    p.add_argument("--batch-size", type=int, default=0, help="images per batch (default: data.eval_batch_size)")
    p.add_argument("--workers", type=int, default=0, help="data loader workers (default 0)")
    p.add_argument("--device", default="cpu", help="torch device for encoding (default cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_search_parser(p) -> None:
    p.add_argument("--index", required=True, help="codes file written by dsrh index")
    p.add_argument("--ckpt", required=True, help="checkpoint that encodes the query images")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="query image files or folders")
    p.add_argument("--k", type=int, default=10, help="results per query (default 10)")
    p.add_argument("--engine", choices=("auto", "faiss", "torch"), default="auto",
                   help="faiss binary index (auto: when installed) or the project's own engine")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--device", default="cpu", help="torch device for encoding (default cpu)")


def _split_data_args(items: Sequence[str]) -> Tuple[Optional[str], List[str], List[str]]:
    split, overrides, paths = None, [], []
    for it in items:
        if it.startswith("split="):
            if split is not None:
                raise ImageInputError(f"more than one split given ({split}, {it[6:]}); write one codes file per split")
            split = it[len("split="):]
        elif Path(it).exists():
            paths.append(it)
        elif "=" in it:
            overrides.append(it)
        else:
            paths.append(it)
    if split is not None and paths:
        raise ImageInputError(f"give either split=... or image files/folders, not both (got split={split} and "
                              f"{paths[0]})")
    if split is None and overrides:
        raise ImageInputError(f"key=value overrides ({overrides[0]}) only apply with split=...")
    return split, overrides, paths


def run_index(args, extra: Sequence[str]) -> int:
    import sys

    split, overrides, paths = _split_data_args(list(args.data) + list(extra))
    module, cfg, whash = load_for_encoding(Path(args.ckpt), overrides)
    module.to(args.device)
    bs = args.batch_size or cfg.data.eval_batch_size
    if split is not None:
        ds, ids, labels = split_dataset(cfg, split)
        source = f"split={split} of {cfg.data.dataset}"
    else:
        files = find_images(paths)
        ds, ids, labels = image_dataset(files, cfg), [str(f) for f in files], None
        source = "images: " + ", ".join(paths)
    codes = encode(module, ds, cfg.eval.threshold, bs, args.workers, progress=not args.no_progress,
                   desc=f"encoding {len(ds)} images")
    write_codes(args.out, codes, ids, labels, checkpoint=str(Path(args.ckpt).resolve()), weights_hash=whash,
                source=source)
    print(f"wrote {len(codes)} codes of {codes.shape[1]} bits ({source}) to {args.out}", file=sys.stderr)
    return 0


def run_search(args, extra: Sequence[str]) -> int:
    import json
    import sys

    if extra:
        raise ImageInputError(f"unrecognised arguments: {' '.join(extra)}")
    if args.k < 1:
        raise ValueError(f"--k must be >= 1, got {args.k}")
    index = read_codes(args.index)
    module, cfg, whash = load_for_encoding(Path(args.ckpt))
    bits = int(cfg.model.bits)
    if bits != index.bits:
        raise IndexFileError(args.index, f"codes have {index.bits} bits but checkpoint {args.ckpt} makes "
                                         f"{bits}-bit codes; index the database with this checkpoint")
    if index.weights_hash and whash != index.weights_hash:
        print(f"warning: {args.index} was written with other weights ({index.checkpoint}, {index.weights_hash}) "
              f"than {args.ckpt} ({whash}); distances may be meaningless", file=sys.stderr)
    files = find_images(args.images)
    module.to(args.device)
    q = encode(module, image_dataset(files, cfg), cfg.eval.threshold, cfg.data.eval_batch_size, progress=False)
    dist, idx, engine = search(q, index, args.k, args.engine)
    results = [{"query": str(f), "results": [{"id": str(index.ids[j]), "index": int(j), "distance": int(d)}
                                             for d, j in zip(dist[r], idx[r])]}
               for r, f in enumerate(files)]
    if args.json:
        print(json.dumps({"index": str(args.index), "k": int(dist.shape[1]), "engine": engine,
                          "queries": results}))
    else:
        for res in results:
            print(f"{res['query']}")
            for rank, r in enumerate(res["results"], 1):
                print(f"  {rank:>4d}  {r['distance']:>4d}  {r['id']}")
    return 0
