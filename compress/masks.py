"""Hold pruned weights at exactly zero while training, with ``torch.nn.utils.parametrize``.

The forward pass sees ``where(mask, w, 0)``: pruned weights are zero in every
step whatever the optimizer does to the stored value (momentum, weight decay),
their gradient is zero, and baking the result in gives exact +0.0 (a multiply
by the mask would give -0.0 for negative weights).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn
from torch.nn.utils import parametrize


class Masked(nn.Module):
    """Parametrization ``w -> where(mask, w, 0)``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.bool())

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, w, torch.zeros((), dtype=w.dtype, device=w.device))


def split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


@contextlib.contextmanager
def parametrized(model: nn.Module, factories: dict[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    """Register one parametrization per named parameter for the duration of a block, then bake it in.

    Args:
        factories: parameter name -> parametrization module (e.g. ``Masked(mask)``).

    Yields:
        The same mapping, so a caller can reach each parametrization's own parameters.
    """
    # removing a parametrization re-registers the parameter last; the order is put back afterwards so that
    # state_dict order (and so the bytes of checkpoints and model files) does not depend on a model's history
    order = {name: list(model.get_submodule(split(name)[0])._parameters) for name in factories}
    for name, p in factories.items():
        module, attr = split(name)
        p.to(next(model.get_submodule(module).parameters()).device)
        parametrize.register_parametrization(model.get_submodule(module), attr, p, unsafe=True)
    try:
        yield factories
    finally:
        for name in factories:
            module, attr = split(name)
            parametrize.remove_parametrizations(model.get_submodule(module), attr, leave_parametrized=True)
            params = model.get_submodule(module)._parameters
            ordered = {k: params[k] for k in order[name] if k in params} | params
            params.clear()
            params.update(ordered)


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Set every pruned weight to exactly +0.0 in place."""
    with torch.no_grad():
        for name, mask in masks.items():
            module, attr = split(name)
            w = getattr(model.get_submodule(module), attr)
            w.masked_fill_(~mask.to(w.device), 0.0)  # in place: no weight-sized temporary; fills +0.0


def held(model: nn.Module, masks: dict[str, torch.Tensor]):
    """Context manager: train with ``masks`` held (pruned weights exactly zero throughout)."""
    return parametrized(model, {name: Masked(mask) for name, mask in masks.items()})
