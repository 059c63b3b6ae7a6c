"""The one record that passes from the second stage (k-means, linear, AdaRound) to the encoder.

A compressed tensor is its shape, the flat positions of the kept weights, one
integer code per kept weight, and a table that maps a code to a float32 value.
The encoder and decoder know nothing about how the codes were found.

This module depends on numpy only, so the codec can build on it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Codebook:
    """Code -> value by lookup: ``value = values[code]`` (k-means weight sharing)."""

    values: np.ndarray  # float32, shape (k,)

    def __post_init__(self):
        object.__setattr__(self, "values", np.ascontiguousarray(self.values, dtype=np.float32).reshape(-1))

    @property
    def size(self) -> int:
        return int(self.values.shape[0])

    def lookup(self, codes: np.ndarray, channels: np.ndarray | None = None) -> np.ndarray:
        return self.values[codes]


@dataclass(frozen=True, eq=False)
class Affine:
    """Code -> value on a uniform grid: ``value = scale[c] * (code - zero_point[c])`` in float32.

    ``c`` is the output channel (index along ``axis``, the first dimension) when
    the grid is per channel, else 0. Codes are unsigned in ``[0, levels)``; a
    symmetric signed grid is stored with ``zero_point = levels // 2``.
    """

    scale: np.ndarray  # float32, shape (channels,)
    zero_point: np.ndarray  # int32, shape (channels,)
    levels: int  # number of codes, 2**bits
    per_channel: bool = False

    def __post_init__(self):
        object.__setattr__(self, "scale", np.ascontiguousarray(self.scale, dtype=np.float32).reshape(-1))
        object.__setattr__(self, "zero_point", np.ascontiguousarray(self.zero_point, dtype=np.int32).reshape(-1))
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point must have the same length")
        if not self.per_channel and self.scale.shape[0] != 1:
            raise ValueError("a per-tensor grid has exactly one scale")

    @property
    def size(self) -> int:
        return int(self.levels)

    def lookup(self, codes: np.ndarray, channels: np.ndarray | None = None) -> np.ndarray:
        c = channels if self.per_channel else 0
        # (code - zp) is an exact small integer; one float32 multiply keeps encoder and decoder bit-identical.
        steps = (codes.astype(np.int32) - self.zero_point[c]).astype(np.float32)
        return (self.scale[c] * steps).astype(np.float32)


Table = Codebook | Affine


@dataclass(frozen=True, eq=False)
class TensorRecord:
    """A compressed tensor: shape, kept positions, codes, code -> value table.

    Args:
        shape: the dense tensor's shape.
        positions: flat (C-order) indices of the kept weights, strictly increasing, int64.
        codes: one code per kept weight, in ``[0, table.size)``.
        table: a ``Codebook`` or an ``Affine`` grid.
    """

    shape: tuple[int, ...]
    positions: np.ndarray
    codes: np.ndarray
    table: Table

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "positions", np.ascontiguousarray(self.positions, dtype=np.int64).reshape(-1))
        object.__setattr__(self, "codes", np.ascontiguousarray(self.codes, dtype=np.int64).reshape(-1))
        if self.positions.shape != self.codes.shape:
            raise ValueError("positions and codes must have the same length")

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1

    def values(self) -> np.ndarray:
        """The float32 value of every kept weight, in position order."""
        channels = None
        if isinstance(self.table, Affine) and self.table.per_channel:
            per_row = self.numel // self.shape[0] if self.shape and self.shape[0] else 1
            channels = self.positions // per_row
        return self.table.lookup(self.codes, channels)

    def to_dense(self) -> np.ndarray:
        """The dense float32 tensor: zeros except the kept positions. Encoder and decoder both use this."""
        dense = np.zeros(self.numel, dtype=np.float32)
        dense[self.positions] = self.values()
        return dense.reshape(self.shape)
