"""Linear (uniform) quantization: ``r = S (q - Z)`` per tensor or per output channel, with optional QAT.

The grid of each tensor comes from its kept weights (min/max, percentile, or the
MSE-optimal clipping search, see ``compress.quant``). Quantization-aware
fine-tuning keeps that grid fixed and trains the float weights through a
straight-through estimator: the forward pass sees ``where(mask, Q(w), 0)``, the
backward pass treats ``Q`` as the identity. Every weight is then rounded to its
nearest grid point and the record's decoded tensor is written into the model,
so the model in memory equals the decoded file bit for bit.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch
from torch import nn

from compress import masks as masks_mod
from compress import quant
from compress.errors import RecipeError, check
from compress.fold import fold_for_quantization
from compress.quant import Granularity, Grid, ScaleMethod
from compress.stages.base import Context, Selection, State, get_param, register
from compress.train import Optimizer, TrainConfig


@dataclass(frozen=True, eq=False)
class LinearConfig(Selection):
    """Uniform quantization of the selected weights.

    Args:
        bits: 2**bits grid points (2..16); 8 keeps accuracy on most models without fine-tuning.
        symmetric: ``Z = 0`` and a grid symmetric about zero (cheapest integer arithmetic);
            else an asymmetric grid over ``[min, max]`` with an integer zero point.
        restricted_range: symmetric only: ``[-(2^(b-1)-1), 2^(b-1)-1]``, the same number of
            steps on both sides of zero (one of the 2^b codes goes unused).
        granularity: ``tensor`` or ``channel`` (one grid per output channel).
        scale_method: ``minmax``, ``percentile`` or ``mse`` (the clipping ratio with the least
            squared rounding error; never worse than min/max).
        percentile: for ``scale_method = "percentile"``, in (50, 100].
        finetune: quantization-aware training with a straight-through estimator on the fixed
            grid, masks held (``epochs = 0``, the default, skips it). Adam with a small rate:
            the weights only need to move within a grid step or two.
        fold_bn: fold BatchNorm into the preceding convs first (as AdaRound does), so both
            methods quantize the same weights on the same grid; the file then holds folded weights.
    """

    bits: int = 8
    symmetric: bool = True
    restricted_range: bool = False
    granularity: Granularity = Granularity.TENSOR
    scale_method: ScaleMethod = ScaleMethod.MSE
    percentile: float = 99.99
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=0, lr=1e-4, optimizer=Optimizer.ADAM, weight_decay=0.0))
    fold_bn: bool = False

    def __post_init__(self):
        check(isinstance(self.bits, int) and 2 <= self.bits <= 16, "bits", f"must be in [2, 16], got {self.bits}")
        check(self.symmetric or not self.restricted_range, "restricted_range",
              "applies to symmetric grids only; set symmetric = true or restricted_range = false")
        check(50.0 < self.percentile <= 100.0, "percentile", f"must be in (50, 100], got {self.percentile}")
        as_enum(self, "granularity", Granularity)
        as_enum(self, "scale_method", ScaleMethod)

    @property
    def per_channel(self) -> bool:
        return self.granularity is Granularity.CHANNEL

    def grid_of(self, w: torch.Tensor, mask: torch.Tensor) -> Grid:
        return quant.grid(w, mask, self.bits, self.symmetric, self.restricted_range, self.per_channel,
                          self.scale_method, self.percentile)


def as_enum(cfg: object, key: str, kind: type[enum.Enum]) -> None:
    """Let Python callers pass a string for an enum field; an unknown one names the allowed values."""
    value = getattr(cfg, key)
    try:
        object.__setattr__(cfg, key, kind(value))
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in kind)
        raise RecipeError(key, f"must be one of {allowed}, got {value!r}") from None


class FakeQuantized(nn.Module):
    """Parametrization ``w -> where(mask, w + (Q(w) - w).detach(), 0)``: quantized forward, identity backward."""

    def __init__(self, g: Grid, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("scale", g.scale.clone())
        self.register_buffer("zero_point", g.zero_point.clone())
        self.register_buffer("mask", mask.bool())
        self.qmin, self.qmax = g.qmin, g.qmax

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        q = quant.fake_quantize(w, self.scale, self.zero_point, self.qmin, self.qmax)
        return torch.where(self.mask, w + (q - w).detach(), torch.zeros((), dtype=w.dtype, device=w.device))


def kept(state: State, name: str, w: torch.Tensor) -> torch.Tensor:
    """The tensor's mask: the pruning mask when there is one, else every position (exact zeros included)."""
    mask = state.masks.get(name)
    return mask.bool() if mask is not None else torch.ones(w.shape, dtype=torch.bool)


@register("quantize", "linear", LinearConfig)
def run(model: nn.Module, state: State, cfg: LinearConfig, ctx: Context) -> dict:
    """Quantize the selected weights onto uniform grids; leave records in ``state.records``.

    Returns:
        ``{"tensors": {name: {bits, symmetric, per_channel, scale, zero_point, mse}}}``; ``scale``
        and ``zero_point`` are lists (one entry per tensor or per channel); ``mse`` is the mean of
        ``(W - Q(W))^2`` over the kept weights.

    Raises:
        RecipeError: ``finetune.epochs > 0`` on a recipe without data.
    """
    if cfg.fold_bn:
        fold_for_quantization(model, state)
    chosen = cfg.select(model)
    grids: dict[str, Grid] = {}
    for name, tcfg in chosen.items():
        w = get_param(model, name)
        mask = kept(state, name, w)
        state.masks[name] = mask
        grids[name] = tcfg.grid_of(w, mask.to(w.device))

    if cfg.finetune.epochs > 0:
        if ctx.data is None:
            raise RecipeError("finetune.epochs", "quantization-aware fine-tuning needs a dataset; "
                                                 "set it to 0 or add [data]")
        finetune(model, state, chosen, grids, cfg, ctx)

    tensors = {}
    for name, tcfg in chosen.items():
        w = get_param(model, name)
        g, mask = grids[name], state.masks[name].to(w.device)
        q = quant.quantize_nearest(w, g.scale, g.zero_point, g.qmin, g.qmax)
        record = quant.to_record(tuple(w.shape), mask, q, g.scale, g.zero_point, tcfg.bits, tcfg.per_channel,
                                 qmin=g.qmin)
        state.records[name] = record
        dense = torch.from_numpy(record.to_dense()).to(w.device)
        n_kept = max(int(mask.count_nonzero()), 1)
        mse = float(torch.where(mask, (w.detach().double() - dense.double()) ** 2, 0.0).sum()) / n_kept
        with torch.no_grad():
            w.copy_(dense)
        tensors[name] = {"bits": tcfg.bits, "symmetric": tcfg.symmetric, "per_channel": tcfg.per_channel,
                         "scale": [float(s) for s in g.scale.cpu()],
                         "zero_point": [int(z) for z in g.zero_point.cpu()], "mse": mse}
        ctx.log.info("linear %s: %d bits, mse %.3g", name, tcfg.bits, mse)
    return {"tensors": tensors}


def finetune(model: nn.Module, state: State, chosen: dict[str, LinearConfig], grids: dict[str, Grid],
             cfg: LinearConfig, ctx: Context) -> None:
    """Quantization-aware training on the fixed grids; every other masked tensor stays masked."""
    factories: dict[str, nn.Module] = {name: FakeQuantized(grids[name], state.masks[name]) for name in chosen}
    for name, mask in state.masks.items():
        if name not in factories:
            factories[name] = masks_mod.Masked(mask)
    with masks_mod.parametrized(model, factories):
        ctx.fit(model, cfg.finetune, seed=ctx.seed + 11, desc="quantization-aware training")
