"""Fold BatchNorm into the convolution (or linear layer) it directly follows.

In eval mode ``BN(conv(x)) = conv'(x)`` with, per output channel ``c``,
``f = gamma_c / sqrt(var_c + eps)``, ``W'_c = f W_c`` and
``b'_c = f (b_c - mean_c) + beta_c``. Quantizing ``W'`` instead of ``W`` is what
a deployed integer network does, and what AdaRound's paper assumes.

Which BN follows which layer is read from a ``torch.fx`` trace of the model
(the BN's only input is the layer's output, used by nothing else). When the
model cannot be traced, module registration order stands in: within one
parent, a BatchNorm registered right after a conv of matching width. Both
depend on the model's code alone, so a fresh model built the same way folds
the same pairs (the decoder relies on this).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

# (layer kind, BatchNorm kinds it may be folded with)
FOLDABLE: tuple[tuple[type, tuple[type, ...]], ...] = (
    (nn.Conv1d, (nn.BatchNorm1d,)),
    (nn.Conv2d, (nn.BatchNorm2d,)),
    (nn.Conv3d, (nn.BatchNorm3d,)),
    (nn.Linear, (nn.BatchNorm1d,)),
)


def fold_batchnorm(model: nn.Module) -> list[str]:
    """Fold every BatchNorm that directly follows a conv/linear layer into it; the BN becomes ``nn.Identity``.

    The layer gains a bias when it had none. Weights that are exactly zero (pruned)
    stay exactly +0.0. Folding uses the running statistics, so eval-mode outputs are
    unchanged up to float rounding; a model with nothing to fold is left as it is, and
    folding twice folds nothing the second time.

    Returns:
        The names of the folded BatchNorm modules (in traced execution order, or module order).
    """
    pairs = _pairs_from_trace(model)
    if pairs is None:
        pairs = _pairs_from_order(model)
    for layer_name, bn_name in pairs:
        fold_into(model.get_submodule(layer_name), model.get_submodule(bn_name))
        parent, _, child = bn_name.rpartition(".")
        setattr(model.get_submodule(parent), child, nn.Identity())
    return [bn for _, bn in pairs]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in model.modules())


def fold_for_quantization(model: nn.Module, state) -> list[str]:
    """Fold BatchNorm before a quantize stage and record it in the stage ``state``, so the file
    says so and the decoder folds a fresh model the same way. Returns the folded names."""
    folded = fold_batchnorm(model) if has_batchnorm(model) else []
    if folded:
        state.folded_bn = True
    return folded


def foldable(layer: nn.Module, bn: nn.Module) -> bool:
    """Whether ``bn`` can be folded into ``layer`` (kinds match, widths match, running statistics kept)."""
    if not isinstance(bn, _BatchNorm) or not bn.track_running_stats or bn.running_mean is None:
        return False
    for kind, bns in FOLDABLE:
        if type(layer) is kind and isinstance(bn, bns):
            width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
            return width == bn.num_features
    return False


@torch.no_grad()
def fold_into(layer: nn.Module, bn: _BatchNorm) -> None:
    """Fold ``bn``'s eval-mode affine map into ``layer``'s weight and bias, in place (float64 arithmetic)."""
    w = layer.weight
    factor = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps) if bn.affine else \
        1.0 / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.double() if bn.affine else torch.zeros_like(factor)
    folded = w.double() * factor.reshape(-1, *([1] * (w.dim() - 1)))
    # +0.0 stays +0.0 (a negative factor would make it -0.0): pruned weights remain exactly zero.
    w.copy_(torch.where(w == 0, torch.zeros((), dtype=w.dtype, device=w.device), folded.to(w.dtype)))
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(factor)
    new_bias = ((bias - bn.running_mean.double()) * factor + shift).to(w.dtype)
    if layer.bias is not None:
        layer.bias.copy_(new_bias)
    else:
        layer.bias = nn.Parameter(new_bias.to(w.device), requires_grad=w.requires_grad)


def _pairs_from_trace(model: nn.Module) -> list[tuple[str, str]] | None:
    """``(layer, bn)`` pairs from a ``torch.fx`` trace; None when the model cannot be traced."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  (any tracing failure: fall back to module order)
        return None
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        src = node.args[0]
        if not isinstance(src, torch.fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        if calls[node.target] != 1 or calls[src.target] != 1:  # a shared module: its fold would be ambiguous
            continue
        if foldable(model.get_submodule(src.target), model.get_submodule(node.target)):
            pairs.append((src.target, node.target))
    return pairs


def _pairs_from_order(model: nn.Module) -> list[tuple[str, str]]:
    """``(layer, bn)`` pairs from registration order: a BN right after a matching layer under one parent."""
    pairs = []
    for parent_name, parent in model.named_modules():
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            if foldable(a, b):
                prefix = f"{parent_name}." if parent_name else ""
                pairs.append((prefix + a_name, prefix + b_name))
    return pairs
