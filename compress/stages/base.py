"""What every stage shares: the registry, tensor selection, the state passed along, the run context.

A stage is a frozen ``XConfig`` dataclass plus ``run(model, state, cfg, ctx)``,
registered under ``(stage, method)``; the runner looks it up and never
branches on names.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn

from compress import train
from compress.errors import RecipeError, check
from compress.record import TensorRecord


@dataclass(frozen=True)
class StageSpec:
    """A registered stage method: its config type and the function that applies it."""

    stage: str
    method: str
    config: type
    run: Callable[..., dict | None]
    needs_data: bool  # stages that train or evaluate cannot run on a data-free recipe
    changes_weights: bool = True


REGISTRY: dict[str, dict[str, StageSpec]] = {}


def register(stage: str, method: str, config: type, *, needs_data: bool = False, changes_weights: bool = True):
    """Decorator: register ``run(model, state, cfg, ctx) -> dict | None`` as ``[stages.<stage>] method = <method>``.

    The first method registered for a stage is its default.
    """

    def decorate(fn):
        REGISTRY.setdefault(stage, {})[method] = StageSpec(stage, method, config, fn, needs_data, changes_weights)
        return fn

    return decorate


@dataclass(frozen=True, eq=False)
class Selection:
    """Which tensors a stage touches, and per-pattern overrides of its per-tensor settings.

    Args:
        include: fnmatch patterns over parameter names; only weights of Linear and
            Conv layers are candidates.
        exclude: patterns removed after ``include``.
        layers: ``{pattern: {field: value}}``; every matching tensor gets those fields,
            later patterns winning over earlier ones. A pattern that matches no
            selected tensor is an error.
    """

    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    layers: dict[str, dict] = field(default_factory=dict)

    def select(self, model: nn.Module) -> dict[str, Any]:
        """Map each selected parameter name to this config with its overrides applied.

        Raises:
            RecipeError: a pattern that matches nothing, or an override out of range.
        """
        names = [n for n in candidate_weights(model)
                 if any(fnmatch.fnmatchcase(n, p) for p in self.include)
                 and not any(fnmatch.fnmatchcase(n, p) for p in self.exclude)]
        for key, patterns in (("include", self.include), ("layers", tuple(self.layers))):
            for p in patterns:
                pool = candidate_weights(model) if key == "include" else names
                if not any(fnmatch.fnmatchcase(n, p) for n in pool):
                    raise RecipeError(f'{key}."{p}"' if key == "layers" else key,
                                      f"pattern {p!r} matches no selected weight; weights are: "
                                      f"{', '.join(names or candidate_weights(model))}")
        chosen = {}
        for name in names:
            overrides: dict = {}
            for pattern, values in self.layers.items():
                if fnmatch.fnmatchcase(name, pattern):
                    overrides.update(values)
            try:
                chosen[name] = dataclasses.replace(self, **overrides) if overrides else self
            except RecipeError as e:
                raise RecipeError(f"layers.{name}.{e.key}", e.message) from None
        return chosen


def candidate_weights(model: nn.Module) -> list[str]:
    """Names of the weights of Linear and Conv layers, in module order."""
    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
            if isinstance(mod, kinds) and getattr(mod, "weight", None) is not None]


def is_conv(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` belongs to a conv layer (paper defaults differ for conv and fc)."""
    module = model.get_submodule(name.rpartition(".")[0])
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d))


def get_param(model: nn.Module, name: str) -> torch.Tensor:
    """The tensor a parameter name refers to, through any parametrization."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name), attr)


@dataclass
class State:
    """What passes between stages besides the model's own weights.

    Attributes:
        masks: parameter name -> bool tensor, True where a weight is kept.
        records: parameter name -> compressed tensor, set by the second stage.
        folded_bn: BatchNorm has been folded into the preceding convs (AdaRound).
        file: the written model file, once encoded.
        stages: per stage: name, method, accuracy, seconds and stage-specific figures.
    """

    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    records: dict[str, TensorRecord] = field(default_factory=dict)
    folded_bn: bool = False
    file: Path | None = None
    stages: list[dict] = field(default_factory=list)


@dataclass
class Context:
    """The run's surroundings, handed to every stage."""

    data: Any  # compress.data.Datasets, or None for a data-free recipe
    device: torch.device
    seed: int
    run_dir: Path
    log: logging.Logger
    pretrain: Any = None  # the recipe's TrainConfig, defaults for fine-tuning
    recipe: Any = None
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def fit(self, model: nn.Module, cfg: train.TrainConfig, *, seed: int, desc: str,
            params: Iterable[nn.Parameter] | None = None) -> list[float]:
        """``train.fit`` on the run's data, device, global batch and process share."""
        return train.fit(model, self.data, cfg, device=self.device, seed=seed, batch_size=self.recipe.data.batch_size,
                         params=params, desc=desc, rank=self.rank, world_size=self.world_size)

    def evaluate(self, model: nn.Module) -> float:
        """Top-1 test accuracy (%), the test split shared among the processes; every rank must call it."""
        batch = self.recipe.data.eval_batch_size if self.recipe is not None and self.recipe.data else 1000
        return train.evaluate(model, self.data, device=self.device, batch_size=batch, rank=self.rank,
                              world_size=self.world_size)


def check_fraction(value: float | None, key: str) -> None:
    if value is not None:
        check(0.0 <= value < 1.0, key, f"must be in [0, 1), got {value}")
