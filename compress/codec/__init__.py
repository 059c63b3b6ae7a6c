"""The codec: records and arrays <-> ``.dcz`` bytes. numpy, bitarray and the standard library only; no torch.

- ``huffman``: canonical Huffman coding of integer symbols (code lengths only are stored),
  and the fixed-width coder it is compared with.
- ``gaps``: sparse positions <-> fixed-width gap symbols with an escape.
- ``container``: the file itself, ``Writer`` / ``Reader``; docs/FORMAT.md is its specification.
"""
from compress.codec.container import (MAGIC, VERSION, Reader, Stream, TensorInfo, TensorStats, Writer, read,
                                      write)
from compress.codec.gaps import best_width, from_gaps, to_gaps
from compress.errors import FormatError

__all__ = ["MAGIC", "VERSION", "FormatError", "Reader", "Stream", "TensorInfo", "TensorStats", "Writer",
           "best_width", "from_gaps", "read", "to_gaps", "write"]
