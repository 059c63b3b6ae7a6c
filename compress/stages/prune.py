"""Magnitude pruning (Han et al. 2015, "Learning both weights and connections"), and the sensitivity scan.

Per tensor: a target sparsity, or the paper's threshold ``quality x std(w)``;
or one magnitude threshold across all selected tensors (``scope = "global"``).
Iterative pruning raises sparsity over ``rounds``, retraining after each with
the masks held, so pruned weights stay exactly zero.
"""
from __future__ import annotations

import enum
import functools
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from compress import distributed
from compress import masks as masks_mod
from compress.errors import RecipeError, check
from compress.stages.base import Context, Selection, State, check_fraction, get_param, register
from compress.train import TrainConfig


class Scope(str, enum.Enum):
    TENSOR = "tensor"  # each tensor reaches its own sparsity (or quality threshold)
    GLOBAL = "global"  # one magnitude threshold across every selected tensor


@dataclass(frozen=True, eq=False)
class PruneConfig(Selection):
    """Magnitude pruning.

    Args:
        sparsity: fraction of weights removed (per tensor, or overall with ``scope = "global"``).
        quality: alternatively, prune ``|w| < quality * std(w)`` (std of the dense tensor).
        scope: ``tensor`` or ``global``.
        rounds: prune-then-retrain rounds; the kept fraction shrinks geometrically to its target,
            so every round removes the same share of what is left.
        retrain: training after each round, with masks held (``epochs = 0`` for one-shot, no retraining).
    """

    sparsity: float | None = None
    quality: float | None = None
    scope: Scope = Scope.TENSOR
    rounds: int = 1
    retrain: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=2, lr=0.01))

    def __post_init__(self):
        check_fraction(self.sparsity, "sparsity")
        check(self.quality is None or 0 < self.quality <= 100, "quality", f"must be in (0, 100], got {self.quality}")
        check((self.sparsity is None) != (self.quality is None), "sparsity",
              "set exactly one of sparsity or quality")
        check(self.scope is Scope.TENSOR or self.sparsity is not None, "scope",
              "global scope needs a sparsity, not a quality")
        check(self.scope is Scope.TENSOR or not self.layers, "layers",
              "per-tensor overrides need scope = \"tensor\"")
        check(1 <= self.rounds <= 100, "rounds", f"must be in [1, 100], got {self.rounds}")


def magnitude_mask(w: torch.Tensor, sparsity: float, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the ``round((1 - sparsity) * numel)`` largest ``|w|``; ties go to the lower index.

    Already-pruned weights (``~keep``) are never revived: they count as pruned first.
    """
    n = w.numel()
    (mask,) = largest_masks([w.detach().cpu()], [None if keep is None else keep.cpu()], n - int(round(sparsity * n)))
    return mask.to(w.device)


def largest_masks(weights: list[torch.Tensor], keeps: list[torch.Tensor | None], n_keep: int) -> list[torch.Tensor]:
    """Masks that keep the ``n_keep`` largest ``|w|`` over all ``weights`` together, among their kept entries.

    The same choice as a stable descending sort of the concatenated ``|w|`` (entries not in
    ``keep`` last): ties go to the earlier tensor, then the lower index. Without a sort: the
    ``n_keep``-th largest magnitude is found by partitioning one float scratch buffer in
    place, then each mask is ``|w| > t``, topped up from the entries equal to ``t`` in order.
    Beyond the masks this needs one float per weight (a sort needed a float copy and int64
    indices, three times as much: 1.2 GB more on VGG-16's 103-million-weight fc layer).

    Args:
        weights: CPU tensors of any shape.
        keeps: per tensor, a bool mask of the entries that may be kept (None: all).
        n_keep: how many entries to keep in all.

    Returns:
        One bool mask per tensor, shaped like it.
    """
    keeps = [None if k is None else k.reshape(w.shape).bool() for w, k in zip(weights, keeps)]
    available = sum(w.numel() if k is None else int(k.count_nonzero()) for w, k in zip(weights, keeps))
    if n_keep >= available:
        return [torch.ones(w.shape, dtype=torch.bool) if k is None else k.clone() for w, k in zip(weights, keeps)]
    if n_keep <= 0:
        return [torch.zeros(w.shape, dtype=torch.bool) for w in weights]
    scratch = torch.empty(sum(w.numel() for w in weights),
                          dtype=functools.reduce(torch.promote_types, (w.dtype for w in weights)))
    start = 0
    for w, k in zip(weights, keeps):
        part = scratch[start:start + w.numel()]
        part.copy_(w.flatten()).abs_()
        if k is not None:
            part.masked_fill_(~k.flatten(), -1.0)  # below every magnitude: never chosen while kept ones remain
        start += w.numel()
    kth = scratch.numel() - n_keep
    scratch.numpy().partition(kth)  # in place: scratch[kth] is the n_keep-th largest, a magnitude (>= 0)
    t = scratch[kth].item()
    del scratch
    masks = []
    for w, k in zip(weights, keeps):
        m = w > t
        m |= w < -t  # |w| > t without a float temporary
        if k is not None:
            m &= k
        masks.append(m)
    missing = n_keep - sum(int(m.count_nonzero()) for m in masks)
    for w, k, m in zip(weights, keeps, masks):
        if missing <= 0:
            break
        tie = w == t
        tie |= w == -t
        if k is not None:
            tie &= k
        chosen = torch.nonzero(tie.flatten()).flatten()[:missing]
        m.view(-1)[chosen] = True
        missing -= chosen.numel()
    return masks


def round_targets(cfg: PruneConfig, r: int) -> tuple[float | None, float | None]:
    """(sparsity, quality) to reach at round ``r`` of ``cfg.rounds`` (1-based)."""
    t = r / cfg.rounds
    if cfg.sparsity is not None:
        return 1.0 - (1.0 - cfg.sparsity) ** t, None
    return None, cfg.quality * t


def compute_masks(model: nn.Module, chosen: dict[str, PruneConfig], scope: Scope, r: int,
                  std: dict[str, float], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The masks of round ``r``: per tensor, or from one global threshold."""
    weights = {name: get_param(model, name).detach().cpu() for name in chosen}  # masks live on the CPU
    if scope is Scope.GLOBAL:
        sparsity, _ = round_targets(next(iter(chosen.values())), r)
        total = sum(w.numel() for w in weights.values())
        masks = largest_masks(list(weights.values()), [old.get(n) for n in weights], total - int(round(sparsity * total)))
        return dict(zip(weights, masks))
    out = {}
    for name, cfg in chosen.items():
        sparsity, quality = round_targets(cfg, r)
        w = weights[name]
        if sparsity is not None:
            out[name] = magnitude_mask(w, sparsity, old.get(name))
        else:
            out[name] = (w.abs() >= quality * std[name]) & old.get(name, torch.ones_like(w, dtype=torch.bool))
    return out


@register("prune", "magnitude", PruneConfig)
def run(model: nn.Module, state: State, cfg: PruneConfig, ctx: Context) -> dict:
    """Prune, retrain with masks held, repeat; leaves the masks in ``state.masks``."""
    chosen = cfg.select(model)
    std = {name: get_param(model, name).detach().float().std().item() for name in chosen}
    retrain = cfg.retrain.epochs > 0
    if retrain and ctx.data is None:
        raise RecipeError("retrain.epochs", "retraining needs a dataset; set it to 0 or add [data]")
    history = []
    for r in range(1, cfg.rounds + 1):
        new = compute_masks(model, chosen, cfg.scope, r, std, state.masks)
        # every rank computed the same masks from the same weights; rank 0's make sure of it
        state.masks.update(distributed.broadcast_masks({n: m.cpu() for n, m in new.items()}))
        masks_mod.apply_masks(model, state.masks)
        entry = {"round": r, "density": density(state.masks, chosen)}
        if retrain:
            with masks_mod.held(model, {n: state.masks[n] for n in chosen}):
                ctx.fit(model, cfg.retrain, seed=ctx.seed + 1000 * r, desc=f"prune round {r}/{cfg.rounds}")
            entry["accuracy"] = ctx.evaluate(model)
        ctx.log.info("prune round %d/%d: density %.4f%s", r, cfg.rounds, entry["density"],
                     f", accuracy {entry['accuracy']:.2f}%" if "accuracy" in entry else "")
        history.append(entry)
    return {"rounds": history}


def density(masks: dict[str, torch.Tensor], names) -> float:
    kept = sum(int(masks[n].count_nonzero()) for n in names)  # a bool sum would make an int64 copy
    total = sum(masks[n].numel() for n in names)
    return kept / max(total, 1)


@dataclass(frozen=True, eq=False)
class SensitivityConfig(Selection):
    """Scan each selected tensor alone over ``sparsities`` (one-shot, no retraining).

    Han et al. chose per-layer pruning rates this way: a layer whose accuracy
    falls early is pruned less.
    """

    sparsities: tuple[float, ...] = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98)

    def __post_init__(self):
        check(len(self.sparsities) > 0, "sparsities", "must list at least one sparsity")
        for i, s in enumerate(self.sparsities):
            check(0.0 <= s < 1.0, f"sparsities[{i}]", f"must be in [0, 1), got {s}")


@register("sensitivity", "magnitude", SensitivityConfig, needs_data=True, changes_weights=False)
def sensitivity(model: nn.Module, state: State, cfg: SensitivityConfig, ctx: Context) -> dict:
    """Accuracy vs sparsity per layer, written as ``sensitivity.{json,md,png}`` in the run folder."""
    from compress import report  # plots pull in matplotlib; only this stage needs them here

    baseline = ctx.evaluate(model)
    table: dict[str, dict[str, float]] = {}
    for name in cfg.select(model):
        w = get_param(model, name)
        saved = w.detach().cpu().clone()
        table[name] = {}
        for s in cfg.sparsities:
            with torch.no_grad():
                w.copy_(torch.where(magnitude_mask(saved, s, state.masks.get(name)), saved, torch.zeros_like(saved)))
            table[name][f"{s:g}"] = ctx.evaluate(model)
            ctx.log.info("sensitivity %s @ %.2f: %.2f%%", name, s, table[name][f"{s:g}"])
        with torch.no_grad():
            w.copy_(saved)
    result = {"baseline": baseline, "accuracy": table}

    def write() -> None:
        report.write_atomic(ctx.run_dir / "sensitivity.json", json.dumps(result, indent=2))
        report.write_atomic(ctx.run_dir / "sensitivity.md", report.sensitivity_markdown(result))
        report.sensitivity_plot(result, ctx.run_dir / "sensitivity.png")

    distributed.on_main(write)
    return result
