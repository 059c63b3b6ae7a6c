"""compress: Deep Compression for PyTorch models.

The pipeline runs from a recipe (``python -m compress.run recipe.toml``); every
stage is also a function on any ``nn.Module``, selecting tensors by name
patterns (default: the weights of every Linear and Conv layer)::

    import torchvision, compress
    model = torchvision.models.resnet18(num_classes=10)
    masks = compress.prune(model, sparsity=0.9)
    records = compress.share(model, bits=5, masks=masks)
    compress.encode(model, records, "resnet18.dcz")
    same = compress.load("resnet18.dcz", torchvision.models.resnet18(num_classes=10))
"""
from __future__ import annotations

__version__ = "0.1.0"

import logging
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from compress.errors import CompressError, FormatError, InputError, RecipeError
from compress.record import Affine, Codebook, TensorRecord

__all__ = ["prune", "share", "quantize", "encode", "decode", "load", "build", "TensorRecord", "Codebook", "Affine",
           "CompressError", "FormatError", "InputError", "RecipeError"]


def _context():
    from compress.stages import Context

    return Context(data=None, device=torch.device("cpu"), seed=0, run_dir=Path("."),
                   log=logging.getLogger("compress"))


def prune(model: nn.Module, *, sparsity: float | None = None, quality: float | None = None,
          scope: str = "tensor", include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
          layers: dict | None = None) -> dict[str, torch.Tensor]:
    """Magnitude-prune ``model`` in place (one shot; retrain with ``compress.masks.held`` in your loop).

    Args:
        sparsity: fraction of weights removed per tensor (or overall with ``scope="global"``).
        quality: alternatively prune ``|w| < quality * std(w)``.
        include, exclude: fnmatch patterns over parameter names (Linear and Conv weights only).
        layers: per-pattern overrides, e.g. ``{"fc3.*": {"sparsity": 0.7}}``.

    Returns:
        Parameter name -> bool mask (True = kept).
    """
    from compress.stages import State, prune as stage
    from compress.train import TrainConfig

    cfg = stage.PruneConfig(sparsity=sparsity, quality=quality, scope=stage.Scope(scope), include=tuple(include),
                            exclude=tuple(exclude), layers=dict(layers or {}), retrain=TrainConfig(epochs=0))
    state = State()
    stage.run(model, state, cfg, _context())
    return state.masks


def share(model: nn.Module, *, bits: int | None = None, init: str = "linear", masks: dict | None = None,
          include: Sequence[str] = ("*",), exclude: Sequence[str] = (), layers: dict | None = None,
          finetune: Callable[[nn.Module, list[nn.Parameter]], None] | None = None,
          seed: int = 0) -> dict[str, TensorRecord]:
    """Share weights by k-means in place: at most ``2**bits`` values per tensor, zeros stay zero.

    Args:
        bits: per tensor; unset = 8 for conv, 5 for fc (the paper's defaults).
        masks: kept positions (from ``prune``); default: the nonzero weights.
        finetune: your training loop, called as ``finetune(model, codebooks)`` while the weights are
            ``codebook[codes]``; optimise ``codebooks`` (and anything else you like) there.

    Returns:
        Parameter name -> record (positions, codes, codebook), ready for ``encode``.
    """
    from compress import masks as masks_mod
    from compress.kmeans1d import Init
    from compress.stages import State, kmeans as stage
    from compress.train import TrainConfig

    cfg = stage.KMeansConfig(bits=bits, init=Init(init), include=tuple(include), exclude=tuple(exclude),
                             layers=dict(layers or {}), finetune=TrainConfig(epochs=0))
    state = State(masks=dict(masks or {}))
    ctx = _context()
    ctx.seed = seed
    stage.run(model, state, cfg, ctx)
    if finetune is not None:
        shared = {n: stage.SharedWeight(r.table.values, stage.dense_codes(r), state.masks[n].bool())
                  for n, r in state.records.items()}
        with masks_mod.parametrized(model, shared):
            finetune(model, [p.codebook for p in shared.values()])
            for n, p in shared.items():
                r = state.records[n]
                state.records[n] = TensorRecord(r.shape, r.positions, r.codes,
                                                Codebook(p.codebook.detach().cpu().numpy()))
    return state.records


def quantize(model: nn.Module, *, bits: int = 8, symmetric: bool = True, per_channel: bool = False,
             masks: dict | None = None, include: Sequence[str] = ("*",), exclude: Sequence[str] = (),
             layers: dict | None = None) -> dict[str, TensorRecord]:
    """Quantize weights linearly in place (``r = S (q - Z)``, MSE-optimal clipping); zeros stay zero.

    Returns:
        Parameter name -> record (positions, codes, scale/zero point), ready for ``encode``.
    """
    from compress.quant import Granularity
    from compress.stages import State, linear as stage

    cfg = stage.LinearConfig(bits=bits, symmetric=symmetric,
                             granularity=Granularity.CHANNEL if per_channel else Granularity.TENSOR,
                             include=tuple(include), exclude=tuple(exclude), layers=dict(layers or {}))
    state = State(masks=dict(masks or {}))
    stage.run(model, state, cfg, _context())
    return state.records


def encode(model: nn.Module, records: dict[str, TensorRecord], path: str | Path, *, coder: str = "huffman",
           gap_bits: int | None = None, raw_dtype: str = "float32") -> int:
    """Write ``model`` to a ``.dcz`` file: tensors with a record compressed, the rest raw.

    Args:
        gap_bits: width of a position gap; None picks per tensor the width with the smallest streams.

    Returns:
        The file's size in bytes.
    """
    from compress import modelfile

    widths = {name: gap_bits for name in records}
    _, size = modelfile.save(path, model.state_dict(), records, coder=coder, gap_bits=widths, raw_dtype=raw_dtype)
    return size


def decode(path: str | Path) -> dict[str, torch.Tensor]:
    """Decode a ``.dcz`` file into a plain state_dict (raises ``FormatError`` on a damaged file)."""
    from compress import modelfile

    return modelfile.decode(path)


def build(recipe: str | Path, overrides: Sequence[str] = ()) -> nn.Module:
    """The model a recipe names, built the way the pipeline builds it (its input shape and
    classes from the recipe's data); pair it with ``load``::

        model = compress.load("artifacts/lenet5_fashion/model.dcz", compress.build("recipes/lenet5_fashion.toml"))

    Raises:
        RecipeError, InputError: a bad recipe, or its data or checkpoint missing.
    """
    from compress import data as data_mod
    from compress import pipeline
    from compress import recipe as recipe_mod

    loaded = recipe_mod.load(recipe, overrides)
    datasets = data_mod.load(loaded.data, seed=loaded.run.seed) if loaded.data else None
    return pipeline.build_model(loaded, datasets)


def load(path: str | Path, model: nn.Module) -> nn.Module:
    """Load a ``.dcz`` file into ``model`` (built the same way as the compressed one) and return it."""
    from compress import modelfile

    return modelfile.load_into(model, path)
