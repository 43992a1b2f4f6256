"""``dsrh index`` and ``dsrh export``: the command bodies (heavy imports happen inside)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

__all__ = ["cmd_index", "cmd_export", "split_data_args"]


def split_data_args(items: Sequence[str]) -> Tuple[Optional[str], List[str], List[str]]:
    """``(split or None, key=value overrides, image paths)`` of ``dsrh index``'s DATA arguments."""
    from ..search.images import ImageInputError

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
    if split is None and not paths:
        raise ImageInputError("nothing to index: give split=database|query|train or image files/folders")
    if split is None:
        data_keys = [o for o in overrides if o.lstrip("-").startswith("data.")]
        if data_keys:
            raise ImageInputError(f"{data_keys[0]}: data.* overrides only apply with split=... (image files are "
                                  "read as given)")
    return split, overrides, paths


def _device_overrides(device: Optional[str]) -> List[str]:
    """``--device cpu|cuda|cuda:N`` as trainer overrides (one process on that device)."""
    if not device:
        return []
    if device == "cpu":
        return ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.strategy=auto"]
    if device.startswith("cuda"):
        index = device.split(":", 1)[1] if ":" in device else "0"
        return ["trainer.accelerator=gpu", f"trainer.devices={index},", "trainer.strategy=auto"]
    from ..errors import InputError

    raise InputError(f"--device {device}: expected cpu, cuda or cuda:N (or use trainer.accelerator / "
                     "trainer.devices for several devices)")


def cmd_index(args, extra: Sequence[str]) -> int:
    from ..errors import InputError

    split, overrides, paths = split_data_args(list(args.data) + list(extra))
    if args.batch_size < 0 or args.workers < 0:
        raise InputError("--batch-size and --workers must be >= 0 (0: the default)")
    if args.shard_size < 1:
        raise InputError(f"--shard-size must be >= 1 (images per shard), got {args.shard_size}")
    from ..search.images import find_images

    files = find_images(paths) if split is None else None  # before the checkpoint: bad paths fail fast
    from ..runs.index import check_output, index_collection

    check_output(Path(args.out))  # before the checkpoint and the data: a bad --out fails at once
    res = index_collection(Path(args.ckpt), Path(args.out), split=split, files=files,
                           overrides=overrides + _device_overrides(args.device), shard_size=args.shard_size,
                           batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress,
                           log=lambda m: print(m, file=sys.stderr))
    if res.get("rank", 0) == 0:
        what = f"split={split}" if split else "images: " + ", ".join(paths)
        n = res["shards"]
        shards = f" ({n} shard{'s' if n != 1 else ''})" if Path(args.out).suffix.lower() != ".npz" else ""
        print(f"wrote {res['count']} codes of {res['bits']} bits ({what}) to {args.out}{shards}", file=sys.stderr)
    return 0


def cmd_export(args, extra: Sequence[str]) -> int:
    from ..errors import InputError

    if extra:
        raise InputError(f"unrecognised arguments: {' '.join(extra)}")
    from ..runs.export import export

    info = export(Path(args.ckpt), Path(args.out), args.format, batch_size=args.batch_size)
    print(f"wrote {args.format} model {args.out}: uint8 images {info['input']} -> {info['output']}",
          file=sys.stderr)
    return 0
