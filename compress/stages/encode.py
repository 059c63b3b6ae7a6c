"""Encode stage: the records (and every other tensor, raw) into the packed ``.dcz`` model file.

Kept positions become gaps of a fixed width (paper: 8 bits for conv, 5 for fc,
or ``auto``: per tensor the width that makes its streams smallest); the code
and gap streams are Huffman-coded separately per tensor. The file written
here is what the pipeline then decodes and evaluates.
"""
from __future__ import annotations

import enum
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import nn

from compress import distributed, modelfile
from compress.errors import RecipeError, check
from compress.stages.base import Context, Selection, State, is_conv, register


class Coder(str, enum.Enum):
    HUFFMAN = "huffman"  # canonical Huffman codes per stream (P+Q+H)
    NONE = "none"  # fixed-width packed codes (P+Q), to show what Huffman adds


class RawDtype(str, enum.Enum):
    FLOAT32 = "float32"
    FLOAT16 = "float16"


@dataclass(frozen=True, eq=False)
class EncodeConfig(Selection):
    """Encoding into the model file.

    Args:
        coder: ``huffman`` or ``none`` (fixed width).
        gap_bits: width of a position gap: an integer 1..16, ``"auto"`` (per tensor, the
            smallest streams), or unset for the paper's 8 (conv) / 5 (fc).
        raw_dtype: how tensors without a record (biases, batch-norm) are stored.
        file: the model file's name in the run folder.
        compare: also size the file with the other coder, for the paper-style breakdown.
    """

    coder: Coder = Coder.HUFFMAN
    gap_bits: int | Literal["auto"] | None = None
    raw_dtype: RawDtype = RawDtype.FLOAT32
    file: str = "model.dcz"
    compare: bool = True

    def __post_init__(self):
        check(self.gap_bits in (None, "auto") or 1 <= self.gap_bits <= 16, "gap_bits",
              f"must be in [1, 16] or \"auto\", got {self.gap_bits!r}")
        check(self.file.endswith(".dcz") and os.path.basename(self.file) == self.file, "file",
              f"must be a plain file name ending in .dcz, got {self.file!r}")

    def width_for(self, model: nn.Module, name: str) -> int | None:
        if self.gap_bits == "auto":
            return None
        return self.gap_bits if self.gap_bits is not None else (8 if is_conv(model, name) else 5)


@register("encode", "huffman", EncodeConfig)
def run(model: nn.Module, state: State, cfg: EncodeConfig, ctx: Context) -> dict:
    """Write ``<run>/<file>``; sets ``state.file``. The pipeline then verifies it by decoding."""
    if not state.records:
        raise RecipeError("stages.encode", "needs a quantize stage before it (nothing to encode)")
    chosen = {n: c for n, c in cfg.select(model).items() if n in state.records}
    widths = {n: c.width_for(model, n) for n, c in chosen.items()}
    missing = [n for n in state.records if n not in chosen]
    if missing:
        raise RecipeError("stages.encode.include", f"{missing[0]!r} was quantized but is not selected for encoding")
    meta = {"model": ctx.recipe.model.name if ctx.recipe else "", modelfile.FOLDED_BN: "1" if state.folded_bn else "0"}
    path = ctx.run_dir / cfg.file
    # rank 0 writes the file; the other processes get its figures (or its error)
    result = distributed.on_main(lambda: write(path, model, state, cfg, widths, meta))
    state.file = path
    return result


def write(path: Path, model: nn.Module, state: State, cfg: EncodeConfig, widths: dict[str, int | None],
          meta: dict[str, str]) -> dict:
    """Write the model file (and, with ``compare``, size it with the other coder); return the figures."""
    model_state = model.state_dict()
    stats, size = modelfile.save(path, model_state, state.records, coder=cfg.coder.value, gap_bits=widths,
                                 raw_dtype=cfg.raw_dtype.value, metadata=meta)
    result = {"file": cfg.file, "file_bytes": size, "coder": cfg.coder.value, "tensors": stats}
    if cfg.compare:
        other = Coder.NONE if cfg.coder is Coder.HUFFMAN else Coder.HUFFMAN
        fd, tmp = tempfile.mkstemp(prefix=".compare.", suffix=".dcz.tmp", dir=path.parent)  # hidden: cleaned if killed
        os.close(fd)
        try:
            _, other_size = modelfile.save(tmp, model_state, state.records, coder=other.value, gap_bits=widths,
                                           raw_dtype=cfg.raw_dtype.value, metadata=meta)
        finally:
            os.unlink(tmp)
        result[f"file_bytes_{other.value}"] = other_size
    return result
