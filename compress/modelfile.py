"""A model's state <-> a ``.dcz`` file: the torch side of the codec.

``save`` writes every entry of a state_dict: compressed tensors from their
records, the rest raw. ``decode`` gives a plain state_dict back, ``load_into``
puts it into a model. The codec below knows only numpy arrays and bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from torch import nn

from compress import failpoints
from compress.codec import container
from compress.errors import FormatError, OutputError
from compress.record import TensorRecord

FOLDED_BN = "folded_bn"


def save(path: str | Path, state_dict: dict[str, torch.Tensor], records: dict[str, TensorRecord], *,
         coder: str = "huffman", gap_bits: dict[str, int | None] | None = None, raw_dtype: str = "float32",
         metadata: dict[str, str] | None = None) -> tuple[list, int]:
    """Write ``state_dict`` to ``path``, tensors with a record compressed, the rest raw.

    Args:
        records: name -> record; each must decode to exactly the state_dict's tensor.
        gap_bits: name -> gap width (None = chosen per tensor to make its streams smallest).
        raw_dtype: ``float32`` or ``float16`` for raw floating-point tensors.

    Returns:
        ``(per-tensor stats, file size in bytes)``.

    Raises:
        OutputError: the file could not be written (disk full ...); a previous file at ``path`` is untouched.
    """
    gap_bits = gap_bits or {}
    try:
        with container.Writer(path, metadata=metadata or {}) as writer:
            for name, tensor in state_dict.items():
                if name in records:
                    writer.add(name, records[name], gap_bits=gap_bits.get(name), coder=coder)
                elif tensor.is_floating_point():
                    writer.add_raw(name, tensor.detach().cpu().float().numpy(), dtype=raw_dtype)
                else:
                    writer.add_raw(name, tensor.detach().cpu().to(torch.int64).numpy(), dtype="int64")
            failpoints.hit(f"write:{Path(path).name}")  # streams written, table and rename to come
    except OSError as e:
        raise OutputError(e.errno, e.strerror, str(path)) from e
    return writer.stats, Path(path).stat().st_size


def decode(path: str | Path, *, allow_elements: int = 0) -> dict[str, torch.Tensor]:
    """Decode a ``.dcz`` file into a plain state_dict of float32 (and int64) tensors.

    Args:
        allow_elements: decode files whose tensors add up to this many elements even when
            that is more than the reader allows for the file's size (``container.element_budget``).

    Raises:
        FormatError: the file is damaged, hostile or not a ``.dcz`` file.
    """
    return tensors(container.Reader(path, allow_elements=allow_elements))


def tensors(reader: container.Reader) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.array(reader.array(name))) for name in reader.names}


def metadata(path: str | Path) -> dict[str, str]:
    return dict(container.Reader(path).metadata)


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (built the way the file's model was).

    BatchNorm is folded first when the file holds folded weights. Names and shapes are
    checked against the model before anything is decoded, so a file can make this
    allocate no more than the model's own size.

    Raises:
        FormatError: the file is damaged, or does not fit the model (missing, extra or
            mis-shaped tensors).
    """
    reader = container.Reader(path, allow_elements=sum(t.numel() for t in model.state_dict().values()))
    if reader.metadata.get(FOLDED_BN) == "1":
        from compress.fold import fold_batchnorm

        fold_batchnorm(model)
    expected = model.state_dict()
    missing = [k for k in expected if k not in reader.names]
    extra = [k for k in reader.names if k not in expected]
    if missing or extra:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise FormatError("tensors", None, f"{path} does not fit this model: {which}")
    for k in reader.names:
        shape = reader.info(k).shape
        if shape != tuple(expected[k].shape):
            raise FormatError(f"tensor {k!r}", None, f"shape {shape} in the file, {tuple(expected[k].shape)} in the model")
    state = tensors(reader)
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()})
    return model


def differing(model_state: dict[str, torch.Tensor], decoded: dict[str, torch.Tensor],
              names: Iterable[str]) -> list[str]:
    """Names whose decoded tensor is not bit-for-bit the model's (NaN-safe, -0.0 vs +0.0 counts)."""
    bad = []
    for name in names:
        a = model_state[name].detach().cpu().float().contiguous()
        b = decoded[name].float().contiguous()
        if a.shape != b.shape or not torch.equal(a.view(torch.int32), b.view(torch.int32)):
            bad.append(name)
    return bad
