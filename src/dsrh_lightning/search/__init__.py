"""Codes files and exact Hamming search.

* :mod:`.codes_file` -- the codes-file format (``dsrh index`` output, ``dsrh eval-codes`` input), numpy only
* :mod:`.shards` -- sharded indexes (a folder: ``manifest.json`` + ``shard-00000.npz`` ...), numpy only
* :mod:`.engines` -- exact search engines (numba scan, torch, faiss) over a codes file or a sharded index
* :mod:`.weights` -- the weights fingerprint stored in codes files
* :mod:`.images` -- image files named on the command line
* :mod:`.encode` -- encoding images / data splits with a loaded run

Only the formats are imported here; import the engines from :mod:`.engines` (they need torch / numba).
"""

from .codes_file import FORMAT, VERSION, CodesFileError, CodesIndex, check_labels, read_codes, write_codes
from .shards import ShardedCodes, open_codes, open_sharded, read_index, write_manifest, write_shard, write_sharded

__all__ = ["FORMAT", "VERSION", "CodesFileError", "CodesIndex", "check_labels", "read_codes", "write_codes",
           "ShardedCodes", "open_codes", "open_sharded", "read_index", "write_manifest", "write_shard", "write_sharded"]
