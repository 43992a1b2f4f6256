"""``dsrh search``: encode query images, search a codes file or a sharded index, print the results.

Each result shows its tie group: the ranks every item at its Hamming distance shares (``1-11`` when
eleven items lie at distance 0; within a group the order is by database index). A result that is
the query image itself is marked, and a query that is in the index but not among the shown results
is reported with its item number, distance and tie group. Ids of in-memory data sets
(``cifar10#53001``) are no files: the output says how to see them (``dsrh show ID``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np

from ..search.codes_file import is_memory_id  # numpy only

__all__ = ["cmd_search", "tie_ranks", "search_results", "print_results"]


def tie_ranks(counts: np.ndarray, distance: int) -> Tuple[int, int]:
    """1-based ``(first, last)`` ranks of the items at ``distance``, given ``counts[d]`` = number of
    items at each distance ``d`` from the query."""
    first = int(counts[:distance].sum()) + 1
    return first, first + int(counts[distance]) - 1


def _label_text(labels, j: int) -> str:
    lab = labels[j]
    if getattr(lab, "ndim", 0) == 0:
        return str(int(lab))
    return ",".join(str(c) for c in np.asarray(lab).nonzero()[0].tolist()) or "-"


def _ranks_text(ties: Sequence[int]) -> str:
    return str(ties[0]) if ties[0] == ties[1] else f"{ties[0]}-{ties[1]}"


def _query_keys(f: Path) -> List[str]:
    """Spellings under which a query file can be an index id (ids are stored resolved)."""
    return sorted({str(f.absolute()), str(f.resolve())})


def search_results(files: Sequence[Path], q: np.ndarray, index, k: int, engine: str) -> dict:
    """The JSON-able result of searching ``index`` with codes ``q`` of ``files``."""
    from ..search.engines import search_with_ties

    dist, idx, used, counts = search_with_ties(q, index, k, engine)  # one pass: top k and tie-group sizes
    ids, labels = index.take(idx)
    found = index.find([key for f in files for key in _query_keys(Path(f))])
    queries = []
    for r, f in enumerate(files):
        self_item: Optional[int] = next((found[key] for key in _query_keys(Path(f)) if key in found), None)
        rows = []
        for c, (d, j) in enumerate(zip(dist[r], idx[r])):
            row = {"rank": c + 1, "ties": list(tie_ranks(counts[r], int(d))), "distance": int(d),
                   "id": str(ids[r, c]), "index": int(j), "is_query": self_item is not None and int(j) == self_item}
            if labels is not None:
                row["label"] = _label_text(labels[r], c)
            rows.append(row)
        entry = {"query": str(f), "results": rows, "query_in_index": None}
        if self_item is not None:
            stored = np.unpackbits(index.packed_at([self_item]), axis=1, count=index.bits)[0]
            d_self = int((stored != q[r]).sum())
            entry["query_in_index"] = {"index": self_item, "distance": d_self,
                                       "ties": list(tie_ranks(counts[r], d_self)),
                                       "shown": any(row["is_query"] for row in rows)}
        queries.append(entry)
    return {"k": int(dist.shape[1]), "engine": used, "queries": queries}


def print_results(out: dict, ckpt: str, has_labels: bool, stream=None) -> None:
    """The text table: ``rank  ties  hamming  [label]  path`` per query, then how to see in-memory ids."""
    stream = stream or sys.stdout
    memory_ids = []
    for res in out["queries"]:
        print(f"query: {res['query']}", file=stream)
        rows = res["results"]
        width = max([len("ties")] + [len(_ranks_text(r["ties"])) for r in rows])
        head = f"  {'rank':>4s}  {'ties':<{width}s}  {'hamming':>7s}"
        print(head + (f"  {'label':>5s}" if has_labels else "") + "  path", file=stream)
        for r in rows:
            lab = f"  {r['label']:>5s}" if has_labels else ""
            mark = "  <- the query itself" if r["is_query"] else ""
            print(f"  {r['rank']:>4d}  {_ranks_text(r['ties']):<{width}s}  {r['distance']:>7d}{lab}  {r['id']}{mark}",
                  file=stream)
            if is_memory_id(r["id"]) and r["id"] not in memory_ids:
                memory_ids.append(r["id"])
        own = res["query_in_index"]
        if own and not own["shown"]:
            print(f"  (the query itself is item {own['index']} of the index: hamming {own['distance']}, one of "
                  f"ranks {_ranks_text(own['ties'])}, below the {len(rows)} shown; ties are ordered by index)",
                  file=stream)
        tied = [r for r in rows if r["ties"][1] > len(rows)]
        if tied:
            t = tied[-1]["ties"]
            print(f"  ({t[1] - len(rows)} more items tie at hamming {tied[-1]['distance']} (ranks "
                  f"{_ranks_text(t)}); --k {t[1]} shows them all)", file=stream)
    if memory_ids:
        print(f"ids like {memory_ids[0]} are images of an in-memory data set, not files; see one with: "
              f"dsrh show {memory_ids[0]} --ckpt {ckpt}", file=stream)


def cmd_search(args, extra: Sequence[str]) -> int:
    from ..errors import InputError
    from ..search.codes_file import CodesFileError
    from ..search.images import find_images
    from ..search.shards import open_codes

    if extra:
        raise InputError(f"unrecognised arguments: {' '.join(extra)}")
    if args.k < 1:
        raise InputError(f"--k must be >= 1 (results per query), got {args.k}")
    index = open_codes(args.index)  # a codes file, or a sharded folder read a shard at a time
    files = find_images(args.images)

    from ..runs.checkpoints import load_run
    from ..search.encode import encode, encoder, image_dataset

    run = load_run(args.ckpt)
    bits = int(run.cfg.model.bits)
    if bits != index.bits:
        raise CodesFileError(args.index, f"codes have {index.bits} bits but checkpoint {args.ckpt} makes "
                                         f"{bits}-bit codes; index the database with this checkpoint")
    if index.weights_hash and run.weights_hash != index.weights_hash:
        print(f"warning: {args.index} was written with other weights ({index.checkpoint}, {index.weights_hash}) "
              f"than {args.ckpt} ({run.weights_hash}); distances may be meaningless", file=sys.stderr)
    model = encoder(run).to(args.device)
    q = encode(model, image_dataset(files, run.cfg), run.cfg.eval.threshold, run.cfg.data.eval_batch_size,
               progress=False)
    out = search_results([Path(f) for f in files], np.asarray(q, dtype=np.uint8), index, args.k, args.engine)
    if args.json:
        print(json.dumps({"index": str(args.index), **out}))
        return 0
    has_labels = any("label" in r for res in out["queries"] for r in res["results"])
    print_results(out, str(args.ckpt), has_labels)
    return 0
