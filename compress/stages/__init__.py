"""The stages. Importing a stage module registers it; the runner looks stages up in ``REGISTRY``."""
from compress.stages.base import REGISTRY, Context, Selection, StageSpec, State, register
from compress.stages import prune, kmeans, linear, adaround, encode  # noqa: F401  (registration)

__all__ = ["REGISTRY", "Context", "Selection", "StageSpec", "State", "register"]
