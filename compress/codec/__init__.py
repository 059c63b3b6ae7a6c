"""The codec: records and arrays <-> bytes. numpy, bitarray and the standard library only; no torch."""
from compress.codec.container import Reader, TensorStats, Writer, read, write

__all__ = ["Reader", "TensorStats", "Writer", "read", "write"]
