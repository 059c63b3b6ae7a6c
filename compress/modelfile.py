"""A model's state <-> a ``.dcz`` file: the torch side of the codec.

``save`` writes every entry of a state_dict: compressed tensors from their
records, the rest raw. ``decode`` gives a plain state_dict back, ``load_into``
puts it into a model. Both directions stream: the writer encodes and writes one
tensor at a time, and ``load_into`` decodes one tensor at a time straight into
the model, so a large model never has all its intermediates in memory at once.
The codec below knows only numpy arrays and bytes.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

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
    # all sparse tensors in one batch (the fast path); every array is freshly made by the reader, never
    # a view of the file, so no copy is needed
    return {name: torch.from_numpy(a) for name, a in container.Reader(path, allow_elements=allow_elements).arrays().items()}


def iter_decode(reader: container.Reader) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, tensor)`` for each tensor of an opened file, decoded one at a time, in file order
    (bounded memory for large models; ``decode`` is faster when everything is wanted at once).

    Raises:
        FormatError: a tensor's payload is damaged or inconsistent (when it is reached).
    """
    for name in reader.names:
        yield name, torch.from_numpy(np.require(reader.array(name), requirements="W"))


def metadata(path: str | Path) -> dict[str, str]:
    return dict(container.Reader(path).metadata)


def load_into(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (built the way the file's model was).

    BatchNorm is folded first when the file holds folded weights. Names and shapes are
    checked against the model before anything is decoded, so a file can make this allocate
    no more than the model's own size; tensors are then decoded one at a time straight into
    the model's own (``decode_into``): loading needs no memory for a second copy of the model.

    Raises:
        FormatError: the file is damaged, or does not fit the model (missing, extra or
            mis-shaped tensors: checked before anything is loaded); a tensor whose payload is
            damaged leaves the tensors before it already loaded.
    """
    reader = container.Reader(path, allow_elements=numel(model.state_dict()))
    if reader.metadata.get(FOLDED_BN) == "1":
        from compress.fold import fold_batchnorm

        fold_batchnorm(model)
    expected = model.state_dict()
    check_fits(reader, expected, path)
    with torch.no_grad():
        for k in reader.names:
            decode_into(reader, k, expected[k])
    return model


def check_fits(reader: container.Reader, expected: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise ``FormatError`` unless the file holds exactly ``expected``'s tensor names, with the same shapes."""
    names = reader.names
    known = set(names)
    missing = [k for k in expected if k not in known]
    extra = [k for k in names if k not in expected]
    if missing or extra:
        which = f"missing {missing[0]!r}" if missing else f"unexpected {extra[0]!r}"
        raise FormatError("tensors", None, f"{path} does not fit this model: {which}")
    for k in names:
        shape = tuple(reader.info(k).shape)
        if shape != tuple(expected[k].shape):
            raise FormatError(f"tensor {k!r}", None, f"shape {shape} in the file, {tuple(expected[k].shape)} in the model")


def decode_into(reader: container.Reader, name: str, target: torch.Tensor) -> None:
    """Decode tensor ``name`` into ``target`` (its shape): a sparse tensor as zeros plus its kept values.

    The same bits as copying ``reader.array(name)``, without its dense temporary.

    Raises:
        FormatError: the tensor's payload is damaged or inconsistent.
    """
    info = reader.info(name)
    if info.encoding == "raw" or info.numel == 0 or not target.is_contiguous():
        target.copy_(torch.from_numpy(np.require(reader.array(name), requirements="W")))
        return
    record = reader.record(name)
    flat = target.view(-1)
    flat.zero_()
    flat[torch.from_numpy(record.positions).to(flat.device)] = torch.from_numpy(record.values()).to(flat)


def differing_in_file(model_state: dict[str, torch.Tensor], path: str | Path, names: Iterable[str]) -> list[str]:
    """``differing`` against the file itself, decoding one tensor at a time.

    Raises:
        FormatError: the file does not fit ``model_state`` (see ``check_fits``), or is damaged.
    """
    reader = container.Reader(path, allow_elements=numel(model_state))
    check_fits(reader, model_state, path)
    bad = []
    for name in names:
        decoded = torch.empty(model_state[name].shape, dtype=torch.float32)
        decode_into(reader, name, decoded)
        bad += differing({name: model_state[name]}, {name: decoded}, [name])
    return bad


def numel(state: dict[str, torch.Tensor]) -> int:
    """Elements of a state_dict: what a file that fits it may decode to (the reader's budget)."""
    return sum(t.numel() for t in state.values())


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
