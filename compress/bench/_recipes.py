"""The recipes the benchmarks run, at each size, and where their run folders live.

``full`` runs a shipped recipe as it is, in the folder ``python -m compress.run RECIPE``
uses (``artifacts/<run name>``), so a baseline or stage checkpoint made before (on
this machine or another) is reused through the pipeline's pretraining cache and
``--resume``. ``tiny`` runs the same recipe on scikit-learn's digits with a few
epochs, in the benchmark's own folder: seconds, to prove the benchmark works.

``COMPRESS_BENCH_MODELS=lenet300`` (a comma-separated subset) limits a benchmark
to some of its models, e.g. to run the slow LeNet-5 figures on another machine.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

import compress
from compress import pipeline
from compress import recipe as recipe_mod
from compress.bench import Size
from compress.errors import InputError
from compress.models import LeNet5
from compress.recipe import Recipe, Stage

RECIPES = Path(compress.__file__).resolve().parent.parent / "recipes"
LENETS = {"lenet300": "lenet300_fashion.toml", "lenet5": "lenet5_fashion.toml"}
NAMES = {"lenet300": "LeNet-300-100", "lenet5": "LeNet-5", "quickstart": "quick-start (MLP on digits)"}
MODELS_ENV = "COMPRESS_BENCH_MODELS"

# the same recipe on digits, short: every stage runs, in seconds
TINY = ('data.name="digits"', "data.batch_size=64", "pretrain.epochs=8", "stages.prune.rounds=2",
        "stages.prune.retrain.epochs=1", "stages.quantize.finetune.epochs=1")
TINY_MODEL = {"lenet5": 'model.name="compress.bench._recipes:lenet5_digits"'}


class PaddedLeNet5(LeNet5):
    """LeNet-5 (same layers and names) seeing 8x8 digits zero-padded to 16x16, the least it can take.

    Only the tiny size uses it: the recipe's per-layer settings apply unchanged.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__((1, 16, 16), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(nn.functional.pad(x, (4, 4, 4, 4)))


def lenet5_digits(num_classes: int = 10) -> nn.Module:
    """Factory for the tiny size (``model.name = "compress.bench._recipes:lenet5_digits"``)."""
    return PaddedLeNet5(num_classes)


def selected(models: list[str]) -> list[str]:
    """``models``, or the subset ``COMPRESS_BENCH_MODELS`` names.

    Raises:
        InputError: the variable names a model this benchmark does not have.
    """
    wanted = [m.strip() for m in os.environ.get(MODELS_ENV, "").split(",") if m.strip()]
    unknown = [m for m in wanted if m not in models]
    if unknown:
        raise InputError(f"{MODELS_ENV}: unknown model {unknown[0]!r}; this benchmark has {', '.join(models)}")
    return [m for m in models if m in wanted] if wanted else list(models)


def lenet_recipe(model: str, size: Size) -> Recipe:
    """The shipped recipe of ``model`` (``lenet300`` or ``lenet5``), shortened on digits for ``tiny``.

    Raises:
        InputError: the recipes folder is missing (an installed package without its repository).
    """
    path = RECIPES / LENETS[model]
    if not path.is_file():
        raise InputError(f"recipe {path}: not found; run the benchmarks from a checkout of the repository")
    overrides = () if size is Size.FULL else (*TINY, *([TINY_MODEL[model]] if model in TINY_MODEL else ()),
                                               f'run.name="{model}_tiny"')
    return recipe_mod.load(path, overrides)


def run_dir(recipe: Recipe, size: Size, out: Path) -> Path:
    """Where a benchmark runs ``recipe``: the recipe's own folder (full) or one inside ``out`` (tiny)."""
    return pipeline.ARTIFACTS / recipe.run.name if size is Size.FULL else out / "runs" / recipe.run.name


def stage(recipe: Recipe, name: str, method: str | None = None) -> Stage:
    """The recipe's stage ``name`` (checked to use ``method``).

    Raises:
        InputError: the recipe has no such stage, or it uses another method.
    """
    for s in recipe.stages:
        if s.name == name and (method is None or s.spec.method == method):
            return s
    raise InputError(f"recipe {recipe.path}: the benchmark needs a [stages.{name}]"
                     f"{f' with method = {method!r}' if method else ''}")
