"""Codes files and exact Hamming search.

* :mod:`.codes_file` -- the codes-file format (``dsrh index`` output, ``dsrh eval-codes`` input), numpy only
* :mod:`.engines` -- exact search engines (torch, faiss)
* :mod:`.weights` -- the weights fingerprint stored in codes files
* :mod:`.images` -- image files named on the command line
* :mod:`.encode` -- encoding images / data splits with a loaded run

Only the format is imported here; import the engines from :mod:`.engines` (they need torch).
"""

from .codes_file import FORMAT, VERSION, CodesFileError, CodesIndex, check_labels, read_codes, write_codes

__all__ = ["FORMAT", "VERSION", "CodesFileError", "CodesIndex", "check_labels", "read_codes", "write_codes"]
