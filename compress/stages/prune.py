"""Magnitude pruning (Han et al. 2015, "Learning both weights and connections"), and the sensitivity scan.

Per tensor: a target sparsity, or the paper's threshold ``quality x std(w)``;
or one magnitude threshold across all selected tensors (``scope = "global"``).
Iterative pruning raises sparsity over ``rounds``, retraining after each with
the masks held, so pruned weights stay exactly zero.
"""
from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from compress import masks as masks_mod
from compress import train
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
    n_keep = n - int(round(sparsity * n))
    score = w.detach().abs().flatten().double()
    if keep is not None:
        score = torch.where(keep.flatten(), score, torch.full_like(score, -1.0))
    order = torch.argsort(score, descending=True, stable=True)
    mask = torch.zeros(n, dtype=torch.bool, device=w.device)
    mask[order[:n_keep]] = True
    if keep is not None:
        mask &= keep.flatten()
    return mask.view_as(w)


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
        flat = torch.cat([w.flatten() for w in weights.values()])
        keep = torch.cat([old[n].flatten() if n in old else torch.ones(w.numel(), dtype=torch.bool)
                          for n, w in weights.items()])
        mask = magnitude_mask(flat, sparsity, keep)
        out, start = {}, 0
        for name, w in weights.items():
            out[name] = mask[start:start + w.numel()].view_as(w)
            start += w.numel()
        return out
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
        state.masks.update({n: m.cpu() for n, m in new.items()})
        masks_mod.apply_masks(model, state.masks)
        entry = {"round": r, "density": density(state.masks, chosen)}
        if retrain:
            with masks_mod.held(model, {n: state.masks[n] for n in chosen}):
                train.fit(model, ctx.data, cfg.retrain, device=ctx.device, seed=ctx.seed + 1000 * r,
                          batch_size=ctx.recipe.data.batch_size, desc=f"prune round {r}/{cfg.rounds}",
                          rank=ctx.rank, world_size=ctx.world_size)
            entry["accuracy"] = train.evaluate(model, ctx.data, device=ctx.device)
        ctx.log.info("prune round %d/%d: density %.4f%s", r, cfg.rounds, entry["density"],
                     f", accuracy {entry['accuracy']:.2f}%" if "accuracy" in entry else "")
        history.append(entry)
    return {"rounds": history}


def density(masks: dict[str, torch.Tensor], names) -> float:
    kept = sum(int(masks[n].sum()) for n in names)
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

    baseline = train.evaluate(model, ctx.data, device=ctx.device)
    table: dict[str, dict[str, float]] = {}
    for name in cfg.select(model):
        w = get_param(model, name)
        saved = w.detach().cpu().clone()
        table[name] = {}
        for s in cfg.sparsities:
            with torch.no_grad():
                w.copy_(torch.where(magnitude_mask(saved, s, state.masks.get(name)), saved, torch.zeros_like(saved)))
            table[name][f"{s:g}"] = train.evaluate(model, ctx.data, device=ctx.device)
            ctx.log.info("sensitivity %s @ %.2f: %.2f%%", name, s, table[name][f"{s:g}"])
        with torch.no_grad():
            w.copy_(saved)
    result = {"baseline": baseline, "accuracy": table}
    if ctx.is_main:
        report.write_atomic(ctx.run_dir / "sensitivity.json", json.dumps(result, indent=2))
        report.write_atomic(ctx.run_dir / "sensitivity.md", report.sensitivity_markdown(result))
        report.sensitivity_plot(result, ctx.run_dir / "sensitivity.png")
    return result
