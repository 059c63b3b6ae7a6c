"""AdaRound (Nagel et al., ICML 2020, "Up or Down? Adaptive Rounding for Post-Training Quantization").

Per layer, in the order a forward pass first executes them, the grid ``(S, Z)``
is fixed by the MSE clipping search and the layer learns, for every weight,
whether to round down or up:

    W~ = S * (clip(floor(W/S) + Z + h(V), qmin, qmax) - Z)
    h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1),   zeta = 1.1, gamma = -0.1

``V`` starts where ``h(V)`` equals the fractional part of ``W/S`` (so ``W~ = W``
inside the grid's range) and minimises, with Adam on batches of cached
calibration inputs,

    || f(W x) - f(W~ x~) ||^2  +  lambda * sum(1 - |2 h(V) - 1|^beta)

where ``x`` is the layer's input in the float model, ``x~`` its input in the
model whose earlier layers are already quantized (the paper's asymmetric
reconstruction) and ``f`` is the ReLU that directly follows the layer, if any.
As in the reference implementations the reconstruction term sums over the
channel (feature) dimension and averages over the batch and spatial positions.
The regulariser is off for the first ``warm_start`` fraction of iterations; then
``beta`` decays linearly from ``beta_start`` to ``beta_end``, pushing every
``h(V)`` to 0 or 1. Finally each weight rounds up where ``h(V) >= 0.5``, so it is
the floor or the ceiling of ``W/S`` on the grid, clipped to ``[qmin, qmax]``.

Pruned weights have no choice to learn: they contribute nothing to the
layer's output, stay exactly zero and are absent from the record.

Several processes (torchrun): calibration is not spread. Every process runs the
whole of it, the same way from the same seed, and the pipeline then gives all of
them rank 0's records (``distributed.share_run_state``), so the wall time is that
of one process. It stays single-process by design: each layer's problem takes
its inputs from the already quantized layers before it, so layers cannot run in
parallel, and within a layer a step is one batch of 32 samples through one layer,
so splitting the batch over N processes would add an all-reduce of the layer's
weight-sized gradient to every one of the 10k steps and cost more than it saves.
Running it on every rank (rather than on rank 0 while the others wait) keeps the
others out of a collective that could time out during hours of calibration. What
it costs on a large model: ``python -m compress.bench adaround_cost`` (ResNet-18,
figures in BENCHMARKS.md).

Limitation: the activation is seen when it is an ``nn.ReLU`` module or a
functional ``relu`` directly applied to the layer's output (through a folded
BatchNorm's ``nn.Identity``), found with a ``torch.fx`` trace. When the model
cannot be traced, only an ``nn.ReLU`` module executed right after the layer is
seen; a functional relu is then missed and the pre-activation output is
reconstructed instead (still a valid, slightly weaker objective).
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from compress import data as data_mod
from compress import masks as masks_mod
from compress import quant
from compress.errors import RecipeError, check
from compress.fold import fold_for_quantization
from compress.quant import Granularity, ScaleMethod
from compress.stages.base import Context, Selection, State, register
from compress.stages.linear import as_enum, kept

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid: h reaches exactly 0 and 1 at finite V
Activation = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class AdaRoundConfig(Selection):
    """AdaRound, with the paper's defaults.

    Args:
        bits: 2**bits grid points (2..16); the paper's headline results are at 4.
        symmetric: ``Z = 0``; else an asymmetric grid with an integer zero point.
        granularity: ``tensor`` (the paper) or ``channel``.
        iterations: Adam steps per layer (paper: 10k).
        batch_size: calibration samples per step (paper: 32).
        calibration_samples: unlabelled training inputs used (paper: 1024).
        lr: Adam's learning rate on ``V`` (reference implementations: 1e-3).
        reg_weight: lambda, the weight of the rounding regulariser (paper: 0.01).
        beta_start, beta_end: the regulariser's exponent, annealed linearly (paper: 20 -> 2).
        warm_start: fraction of iterations without the regulariser first (reference: 0.2).
        cache_mb: memory budget for one layer's cached inputs and targets; above it they are
            recomputed for every batch (slower, same result).
        fold_bn: fold BatchNorm into the preceding convs first, so the quantized weights are
            the ones an integer network would use; the model file then holds folded weights.
        seed: draws the calibration samples and the batch order; unset = ``run.seed``. Setting it
            repeats AdaRound on one baseline with other data (the paper's mean ± std over runs).
    """

    bits: int = 4
    symmetric: bool = True
    granularity: Granularity = Granularity.TENSOR
    iterations: int = 10_000
    batch_size: int = 32
    calibration_samples: int = 1024
    lr: float = 1e-3
    reg_weight: float = 0.01
    beta_start: float = 20.0
    beta_end: float = 2.0
    warm_start: float = 0.2
    cache_mb: int = 512
    fold_bn: bool = True
    seed: int | None = None

    def __post_init__(self):
        check(isinstance(self.bits, int) and 2 <= self.bits <= 16, "bits", f"must be in [2, 16], got {self.bits}")
        check(1 <= self.iterations <= 1_000_000, "iterations", f"must be in [1, 1000000], got {self.iterations}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        check(self.calibration_samples >= 1, "calibration_samples", f"must be >= 1, got {self.calibration_samples}")
        check(0 < self.lr <= 10, "lr", f"must be in (0, 10], got {self.lr}")
        check(self.reg_weight >= 0, "reg_weight", f"must be >= 0, got {self.reg_weight}")
        check(self.beta_end >= 1, "beta_end", f"must be >= 1 (the regulariser's gradient is unbounded below), "
                                              f"got {self.beta_end}")
        check(self.beta_start >= self.beta_end, "beta_start",
              f"must be >= beta_end = {self.beta_end}, got {self.beta_start}")
        check(0 <= self.warm_start < 1, "warm_start", f"must be in [0, 1), got {self.warm_start}")
        check(self.cache_mb >= 0, "cache_mb", f"must be >= 0, got {self.cache_mb}")
        check(self.seed is None or self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        as_enum(self, "granularity", Granularity)

    @property
    def per_channel(self) -> bool:
        return self.granularity is Granularity.CHANNEL


# --- the relaxation ----------------------------------------------------------------------------------------------

def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """``h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def init_v(frac: torch.Tensor) -> torch.Tensor:
    """The ``V`` with ``h(V) = frac`` for ``frac`` in [0, 1): ``V = -log((zeta - gamma) / (frac - gamma) - 1)``."""
    return -torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1.0)


def beta_at(step: int, iterations: int, warm_start: float, beta_start: float, beta_end: float) -> float | None:
    """The regulariser's exponent at ``step`` (0-based); None during the warm start (no regulariser).

    After ``warm_start * iterations`` steps it decays linearly from ``beta_start`` to ``beta_end``
    at the last step, as in the reference implementation.
    """
    warm = warm_start * iterations
    if step < warm:
        return None
    rel = (step - warm) / max(iterations - warm, 1.0)
    return beta_end + (beta_start - beta_end) * max(0.0, 1.0 - rel)


def round_loss(h: torch.Tensor, beta: float) -> torch.Tensor:
    """``sum(1 - |2h - 1|^beta)``: zero only when every ``h`` is 0 or 1."""
    return (1.0 - (2.0 * h - 1.0).abs().pow(beta)).sum()


def reconstruction_loss(out: torch.Tensor, target: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """Squared error summed over channels, averaged over everything else (batch, positions)."""
    return (out - target).pow(2).sum(channel_dim).mean()


def layer_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``layer(x)`` with ``weight`` in place of its own (its bias and settings kept)."""
    if isinstance(layer, nn.Linear):
        return F.linear(x, weight, layer.bias)
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        return layer._conv_forward(x, weight, layer.bias)
    raise TypeError(f"AdaRound handles Linear and Conv layers, not {type(layer).__name__}")


def channel_dim(layer: nn.Module) -> int:
    return -1 if isinstance(layer, nn.Linear) else 1


# --- calibration data for one layer ------------------------------------------------------------------------------

class CachedData:
    """A layer's inputs and targets held in memory, one row per calibration sample."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor):
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return len(self.inputs)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[idx], self.targets[idx]

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), size):
            yield self.inputs[i:i + size], self.targets[i:i + size]


class _Stop(Exception):
    """Raised by a hook once the wanted tensor is captured: the rest of the forward pass is skipped."""


@torch.no_grad()
def capture(model: nn.Module, module_name: str, x: torch.Tensor, *, output: bool) -> torch.Tensor:
    """The first input (or output) of ``model.<module_name>`` when ``model`` runs on ``x``."""
    module = model.get_submodule(module_name)
    got: list[torch.Tensor] = []

    def pre(_m, args):
        got.append(args[0].detach())
        raise _Stop

    def post(_m, _args, out):
        got.append(out.detach())
        raise _Stop

    handle = module.register_forward_hook(post) if output else module.register_forward_pre_hook(pre)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not got:
        raise RuntimeError(f"{module_name} was not executed in the forward pass")
    return got[0]


class RecomputedData:
    """A layer's inputs (quantized model) and targets (float model), recomputed for each batch.

    Used when caching them for every calibration sample would exceed ``cache_mb``.
    """

    def __init__(self, qmodel: nn.Module, fp_model: nn.Module, module_name: str, calib: torch.Tensor,
                 activation: Activation | None):
        self.qmodel, self.fp_model, self.name, self.calib, self.activation = (
            qmodel, fp_model, module_name, calib, activation)

    def __len__(self) -> int:
        return len(self.calib)

    def batch(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._pair(self.calib[idx])

    def chunks(self, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, len(self), size):
            yield self._pair(self.calib[i:i + size])

    def _pair(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        target = capture(self.fp_model, self.name, x, output=True)
        if self.activation is not None:
            target = self.activation(target)
        return capture(self.qmodel, self.name, x, output=False), target


def layer_data(qmodel: nn.Module, fp_model: nn.Module, module_name: str, calib: torch.Tensor,
               activation: Activation | None, cache_mb: int, chunk: int = 128) -> CachedData | RecomputedData:
    """Inputs from ``qmodel`` and (activated) targets from ``fp_model`` for one layer: cached if they fit."""
    lazy = RecomputedData(qmodel, fp_model, module_name, calib, activation)
    x, t = lazy.batch(torch.arange(1))
    per_sample = x.numel() * x.element_size() + t.numel() * t.element_size()
    if per_sample * len(calib) > cache_mb * 2 ** 20:
        return lazy
    parts = list(lazy.chunks(chunk))
    return CachedData(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))


# --- one layer ---------------------------------------------------------------------------------------------------

class Rounded(NamedTuple):
    """AdaRound's result for one layer.

    Attributes:
        q: int64 grid integers, the weight's shape (pruned positions hold ``Z``, value 0).
        weight: float32 ``S (q - Z)``, exactly zero at pruned positions.
        soft: the final ``h(V)`` (in between 0 and 1 where still undecided; 0 where a weight had no
            choice: pruned, or clipped at the grid's ends).
        up: True where the weight rounds up (``h(V) >= 0.5``).
    """

    q: torch.Tensor
    weight: torch.Tensor
    soft: torch.Tensor
    up: torch.Tensor


def weight_grad(layer: nn.Module, x: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                activation: Activation | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """``d reconstruction_loss / d weight`` for one batch.

    For a Linear layer the weight gradient is one matmul into ``out`` (no fresh weight-sized
    tensor per step); for a conv, autograd through the layer.
    """
    if isinstance(layer, nn.Linear) and out is not None:
        with torch.no_grad():
            pre = F.linear(x, weight, layer.bias)
        pre.requires_grad_(True)
        post = activation(pre) if activation is not None else pre
        reconstruction_loss(post, target, -1).backward()
        return torch.mm(pre.grad.reshape(-1, pre.shape[-1]).t(), x.reshape(-1, x.shape[-1]), out=out)
    leaf = weight.detach().requires_grad_(True)
    post = layer_forward(layer, x, leaf)
    if activation is not None:
        post = activation(post)
    reconstruction_loss(post, target, channel_dim(layer)).backward()
    return leaf.grad


class _Relaxation:
    """``W~(V) = w_base + s_free * h(V)`` and the gradient of the AdaRound loss with respect to ``V``.

    Autograd handles the layer (``dL/dW~``); the elementwise chain from ``W~`` back to ``V``,
    and the regulariser's gradient, are written out into preallocated buffers: on a
    400k-weight layer this is several times faster than autograd's fresh temporaries,
    with the same result (``test_relaxation_gradient_matches_autograd``).
    """

    def __init__(self, v: torch.Tensor, w_base: torch.Tensor, s_free: torch.Tensor):
        self.v, self.w_base, self.s_free = v, w_base, s_free
        self.s_stretch = s_free * (ZETA - GAMMA)  # dW~/dh times dh/dsigmoid, where the clip is inactive
        self.sig, self.h, self.gh, self.tmp, self.gv, self.wq = (torch.empty_like(w_base) for _ in range(6))
        self.gamma = torch.tensor(GAMMA, dtype=w_base.dtype, device=w_base.device)
        self.minus_one = torch.tensor(-1.0, dtype=w_base.dtype, device=w_base.device)

    @torch.no_grad()
    def weight(self) -> torch.Tensor:
        """The soft-quantized weight for the current ``V`` (a buffer, overwritten by the next call)."""
        torch.sigmoid(self.v, out=self.sig)
        torch.add(self.gamma, self.sig, alpha=ZETA - GAMMA, out=self.h)
        self.h.clamp_(0.0, 1.0)
        torch.addcmul(self.w_base, self.s_free, self.h, out=self.wq)
        return self.wq

    @torch.no_grad()
    def grad(self, grad_w: torch.Tensor, reg_weight: float, beta: float | None) -> torch.Tensor:
        """``dL/dV`` for ``L = rec + reg_weight * sum(1 - |2h - 1|^beta)``, from ``dL/dW~`` of the reconstruction.

        Where the clip of ``h`` is active (``h`` exactly 0 or 1) the gradient is zero; weights
        without a choice (pruned, or clipped by the grid) start there and never move.
        """
        gh = self.gh  # (zeta - gamma) dL/dh
        torch.mul(grad_w, self.s_stretch, out=gh)
        if reg_weight and beta is not None:
            u, r = self.gv, self.tmp  # both free until the end
            torch.add(self.minus_one, self.h, alpha=2.0, out=u)
            torch.abs(u, out=r)
            if beta == 1.0:
                r.fill_(1.0)
            else:  # |u|^(beta-1) as exp((beta-1) log|u|): twice as fast as pow on CPU; log 0 = -inf gives 0
                torch.log(r, out=r)
                r.mul_(beta - 1.0)
                torch.exp(r, out=r)
            torch.copysign(r, u, out=r)  # d/dh (1 - |u|^beta) = -2 beta sign(u) |u|^(beta - 1)
            gh.add_(r, alpha=-2.0 * beta * reg_weight * (ZETA - GAMMA))
        torch.addcmul(self.sig, self.sig, self.sig, value=-1.0, out=self.tmp)  # sigmoid' = sig (1 - sig)
        self.tmp.mul_(gh)
        torch.ops.aten.hardtanh_backward.grad_input(self.tmp, self.h, 0.0, 1.0, grad_input=self.gv)
        return self.gv


def adaround_layer(layer: nn.Module, inputs, targets: torch.Tensor | None, scale: torch.Tensor,
                   zero_point: torch.Tensor, qmin: int, qmax: int, mask: torch.Tensor | None = None,
                   cfg: AdaRoundConfig | None = None, activation: Activation | None = None, *,
                   seed: int = 0) -> Rounded:
    """Learn the rounding of one layer's weight on a fixed grid.

    Args:
        layer: a Linear or Conv layer; its weight and bias are read, never changed.
        inputs: the layer's inputs ``x~`` (a tensor with one row per sample), or a
            ``CachedData`` / ``RecomputedData`` (then ``targets`` is None).
        targets: the float model's (activated) layer outputs for the same samples.
        scale, zero_point, qmin, qmax: the grid (``compress.quant.grid``).
        mask: True where a weight is kept (None: all).
        cfg: iterations, batch size, lr, lambda and the beta schedule.
        activation: applied to the layer's output before the loss (e.g. ``torch.relu``).
        seed: seeds the batch sampling.

    Returns:
        ``Rounded(q, weight, soft, up)``; every kept ``q`` is ``floor(W/S) + Z`` or one more,
        clipped to ``[qmin, qmax]``.
    """
    cfg = cfg or AdaRoundConfig()
    data = inputs if targets is None else CachedData(inputs, targets)
    w = layer.weight.detach().float()
    s = quant.broadcast_channels(scale.to(w.device, torch.float32), w)
    z = quant.broadcast_channels(zero_point.to(w.device), w).float()
    mask = torch.ones_like(w, dtype=torch.bool) if mask is None else mask.to(w.device).bool()

    base = torch.floor(w / s)
    frac = (w / s - base).clamp(0.0, 1.0 - 1e-6)  # frac < 1 keeps init_v finite
    down = base + z  # the grid integer when rounding down
    # Only weights whose floor and ceiling both lie on the grid have a choice; clipped ones are fixed.
    active = mask & (down >= qmin) & (down <= qmax - 1)
    zero = torch.zeros((), dtype=w.dtype, device=w.device)
    fixed = torch.where(mask, s * (torch.clamp(down, qmin, qmax) - z), zero)
    w_base = torch.where(active, s * base, fixed)  # W~ = w_base + s_free * h(V)
    s_free = torch.where(active, s.expand_as(w), zero)

    # Weights without a choice start at h = 0 exactly, where the gradient is zero: they never move.
    v = nn.Parameter(torch.where(active, init_v(frac), torch.full_like(w, -10.0)))
    relaxed = _Relaxation(v, w_base, s_free)
    optimizer = torch.optim.Adam([v], lr=cfg.lr, fused=v.device.type in ("cpu", "cuda"))
    generator = torch.Generator().manual_seed(seed)
    n = len(data)
    grad_buffer = torch.empty_like(w) if isinstance(layer, nn.Linear) else None
    requires = [p.requires_grad for p in layer.parameters()]
    for p in layer.parameters():
        p.requires_grad_(False)
    try:
        for step in range(cfg.iterations):
            idx = torch.randperm(n, generator=generator)[:cfg.batch_size].to(w.device)
            x, target = data.batch(idx)
            grad_w = weight_grad(layer, x, target, relaxed.weight(), activation, grad_buffer)
            beta = beta_at(step, cfg.iterations, cfg.warm_start, cfg.beta_start, cfg.beta_end)
            v.grad = relaxed.grad(grad_w, cfg.reg_weight if beta is not None else 0.0, beta)
            optimizer.step()
    finally:
        for p, r in zip(layer.parameters(), requires):
            p.requires_grad_(r)

    with torch.no_grad():
        soft = rectified_sigmoid(v)
        up = active & (soft >= 0.5)
        q = torch.where(active, down + up.float(), torch.clamp(down, qmin, qmax))
        q = torch.where(mask, q, z.expand_as(q)).to(torch.int64)
        weight = torch.where(mask, quant.dequantize(q, scale, zero_point), zero)
    return Rounded(q, weight, torch.where(active, soft, up.float()), up)


@torch.no_grad()
def reconstruction_mse(layer: nn.Module, data, weights: list[torch.Tensor], activation: Activation | None,
                       chunk: int = 256) -> list[float]:
    """Mean squared error of the layer's (activated) output against the targets, for each of ``weights``."""
    totals, count = [0.0] * len(weights), 0
    for x, target in data.chunks(chunk):
        for i, w in enumerate(weights):
            out = layer_forward(layer, x, w)
            if activation is not None:
                out = activation(out)
            totals[i] += float((out - target).double().pow(2).sum())
        count += target.numel()
    return [t / max(count, 1) for t in totals]


# --- network order and activations -------------------------------------------------------------------------------

@torch.no_grad()
def execution_order(model: nn.Module, module_names: list[str], x: torch.Tensor) -> list[str]:
    """``module_names`` in the order a forward pass on ``x`` first executes them (unexecuted ones left out)."""
    seen: list[str] = []
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, _a, n=n: seen.append(n) if n not in seen else None) for n in module_names]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


_RELU_FUNCTIONS = {torch.relu, torch.relu_, F.relu, F.relu_}


def relu_follows(model: nn.Module, module_names: list[str], x: torch.Tensor) -> set[str]:
    """Those of ``module_names`` whose output goes straight into a ReLU (and nowhere else).

    Read from a ``torch.fx`` trace (module or functional ReLU, through ``nn.Identity``); when the
    model cannot be traced, from the modules a forward pass on ``x`` executes (module ReLU only).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001  (untraceable model: fall back to execution order)
        return _relu_from_execution(model, module_names, x)
    wanted = set(module_names)
    verdict: dict[str, bool] = {}
    for node in graph.nodes:
        if node.op != "call_module" or node.target not in wanted:
            continue
        cur, found = node, False
        while len(cur.users) == 1:
            user = next(iter(cur.users))
            if user.op == "call_module" and isinstance(model.get_submodule(user.target), nn.Identity):
                cur = user
                continue
            found = (user.op == "call_module" and isinstance(model.get_submodule(user.target), nn.ReLU)) or \
                (user.op == "call_function" and user.target in _RELU_FUNCTIONS) or \
                (user.op == "call_method" and user.target in ("relu", "relu_"))
            break
        verdict[node.target] = verdict.get(node.target, True) and found  # every call must be followed by ReLU
    return {n for n, ok in verdict.items() if ok}


@torch.no_grad()
def _relu_from_execution(model: nn.Module, module_names: list[str], x: torch.Tensor) -> set[str]:
    calls: list[tuple[str, nn.Module]] = []
    leaves = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    handles = [m.register_forward_pre_hook(lambda mod, _a, n=n: calls.append((n, mod))) for n, m in leaves]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    calls = [(n, m) for n, m in calls if not isinstance(m, nn.Identity)]
    found = set()
    for (name, _), (_, nxt) in zip(calls, calls[1:]):
        if name in module_names and isinstance(nxt, nn.ReLU):
            found.add(name)
    return found


# --- the stage ---------------------------------------------------------------------------------------------------

@register("quantize", "adaround", AdaRoundConfig, needs_data=True)
def run(model: nn.Module, state: State, cfg: AdaRoundConfig, ctx: Context) -> dict:
    """AdaRound every selected layer in network order; leave records in ``state.records``.

    Returns:
        ``{"folded_bn": [...], "calibration_samples": n, "layers": {name: {...}}}``; per layer:
        ``bits``, ``scale``, ``zero_point``, ``activation``, ``mse_nearest`` and ``mse_adaround``
        (the layer's output error on the calibration set, same grid, same quantized inputs),
        ``flipped`` (fraction of kept weights rounded differently from nearest), ``undecided``
        (fraction of ``h(V)`` not yet exactly 0 or 1 at the end), ``seconds``, ``cached``.

    Raises:
        RecipeError: no data to calibrate on.
    """
    if ctx.data is None:
        raise RecipeError("stages.quantize", "adaround needs calibration data; add [data]")
    folded = fold_for_quantization(model, state) if cfg.fold_bn else []
    if folded:
        ctx.log.info("adaround: folded %d BatchNorm layers", len(folded))
    masks_mod.apply_masks(model, state.masks)  # the float reference below must have its pruned weights at zero too
    chosen = cfg.select(model)
    model.to(ctx.device)
    was_training = model.training
    model.eval()
    seed = ctx.seed if cfg.seed is None else cfg.seed
    calib = data_mod.calibration_batch(ctx.data, cfg.calibration_samples, seed).to(ctx.device)
    modules = {name.rpartition(".")[0]: name for name in chosen}
    order = execution_order(model, list(modules), calib[:2])
    relu = relu_follows(model, list(modules), calib[:2])
    executed = set(order)
    order += [m for m in modules if m not in executed]  # never executed: nearest rounding, no data to fit
    fp_model = copy.deepcopy(model).requires_grad_(False)  # the float reference (folded, like the model)

    layers = {}
    try:
        for i, module_name in enumerate(order):
            name = modules[module_name]
            layers[name] = quantize_layer(model, fp_model, state, name, module_name, chosen[name], cfg, calib,
                                          torch.relu if module_name in relu else None,
                                          executed=module_name in executed, seed=seed + i)
            f = layers[name]
            ctx.log.info("adaround %s: mse nearest %.4g -> adaround %.4g, %.1f%% flipped, %.1f s", name,
                         f["mse_nearest"], f["mse_adaround"], 100 * f["flipped"], f["seconds"])
    finally:
        model.train(was_training)
    return {"folded_bn": folded, "calibration_samples": len(calib), "layers": layers}


def quantize_layer(model: nn.Module, fp_model: nn.Module, state: State, name: str, module_name: str,
                   tcfg: AdaRoundConfig, cfg: AdaRoundConfig, calib: torch.Tensor, activation: Activation | None,
                   *, executed: bool, seed: int) -> dict:
    """Grid, AdaRound, record, and the quantized weight written into ``model`` for one layer."""
    layer = model.get_submodule(module_name)
    w = layer.weight
    mask = kept(state, name, w).to(w.device)
    state.masks[name] = mask.cpu()
    with torch.no_grad():
        w.copy_(torch.where(mask, w, torch.zeros((), dtype=w.dtype, device=w.device)))
    g = quant.grid(w, mask, tcfg.bits, tcfg.symmetric, False, tcfg.per_channel, ScaleMethod.MSE)
    nearest = quant.quantize_nearest(w, g.scale, g.zero_point, g.qmin, g.qmax)
    nearest_w = torch.where(mask, quant.dequantize(nearest, g.scale, g.zero_point), 0.0)
    figures = {"bits": tcfg.bits, "scale": [float(s) for s in g.scale.cpu()],
               "zero_point": [int(z) for z in g.zero_point.cpu()],
               "activation": "relu" if activation is not None else "none"}
    start = time.perf_counter()
    if not executed:  # the forward pass never runs it: nothing to reconstruct, nearest rounding
        data = None
    else:
        data = layer_data(model, fp_model, module_name, calib, activation, cfg.cache_mb)
    if data is None:
        q, mse = nearest, [math.nan, math.nan]
        figures.update(flipped=0.0, undecided=0.0, cached=False)
    else:
        r = adaround_layer(layer, data, None, g.scale, g.zero_point, g.qmin, g.qmax, mask, tcfg, activation,
                           seed=seed)
        q = r.q
        mse = reconstruction_mse(layer, data, [nearest_w, r.weight], activation)
        n_kept = max(int(mask.count_nonzero()), 1)
        undecided = ((r.soft > 0) & (r.soft < 1) & mask).sum()
        figures.update(flipped=int(((q != nearest) & mask).sum()) / n_kept, undecided=int(undecided) / n_kept,
                       cached=isinstance(data, CachedData))
    figures.update(mse_nearest=mse[0], mse_adaround=mse[1], seconds=time.perf_counter() - start)
    record = quant.to_record(tuple(w.shape), mask, q, g.scale, g.zero_point, tcfg.bits, tcfg.per_channel,
                             qmin=g.qmin)
    state.records[name] = record
    with torch.no_grad():
        w.copy_(torch.from_numpy(record.to_dense()).to(w.device))
    return figures
