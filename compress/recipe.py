"""TOML recipe -> validated, typed, frozen configs.

One generic builder walks a config dataclass's fields and their type hints, so
a new stage only declares its ``XConfig``: unknown keys (listing the allowed
ones), wrong types and enum values are caught here with the dotted key at
fault; range checks live in each config's ``__post_init__``.
"""
from __future__ import annotations

import dataclasses
import enum
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from compress.data import DataConfig
from compress.errors import RecipeError, check
from compress.models import ModelConfig
from compress.stages import REGISTRY, StageSpec
from compress.train import TrainConfig


class Device(str, enum.Enum):
    AUTO = "auto"  # CUDA when present, else CPU
    CPU = "cpu"
    CUDA = "cuda"


@dataclass(frozen=True)
class RunConfig:
    """Run-wide settings.

    Args:
        name: the run folder under ``artifacts/`` (``--out`` overrides it).
        seed: seeds data order, initialisation and k-means; same seed, same file.
        device: ``auto`` picks CUDA when present (under torchrun, each process its ``cuda:LOCAL_RANK``), else the CPU.
        threads: torch intra-op threads; 0 keeps torch's default.
    """

    name: str = "run"
    seed: int = 0
    device: Device = Device.AUTO
    threads: int = 0

    def __post_init__(self):
        check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
              "name", f"must be a plain folder name, got {self.name!r}")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class Stage:
    """One entry of ``[stages]``: which stage, which method, its validated config."""

    name: str
    spec: StageSpec
    config: Any


@dataclass(frozen=True)
class Recipe:
    """A whole validated recipe; ``source`` is the resolved TOML table (overrides applied)."""

    run: RunConfig
    model: ModelConfig
    data: DataConfig | None
    pretrain: TrainConfig
    stages: tuple[Stage, ...]
    source: dict = field(repr=False, compare=False, default_factory=dict)
    path: Path | None = None


SECTIONS = {"run": RunConfig, "model": ModelConfig, "data": DataConfig, "pretrain": TrainConfig}


def load(path: str | Path, overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read, override and validate a recipe file.

    Args:
        path: the TOML file.
        overrides: ``key.path=value`` strings (``--set``); the value is parsed as TOML,
            falling back to a bare string.

    Raises:
        RecipeError: naming the dotted key (or the file) at fault.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError("", f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError("", f"recipe {path}: cannot read ({e.__class__.__name__})") from None
    try:
        table = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError("", f"recipe {path}: not valid TOML ({e})") from None
    for item in overrides:
        apply_override(table, item)
    return from_dict(table, path)


def from_dict(table: dict, path: Path | None = None) -> Recipe:
    """Validate a recipe already parsed into a dict (see ``load``)."""
    unknown = set(table) - set(SECTIONS) - {"stages"}
    if unknown:
        key = sorted(unknown)[0]
        raise RecipeError(key, f"unknown section; allowed: {', '.join([*SECTIONS, 'stages'])}")
    if "model" not in table:
        raise RecipeError("model", "missing; every recipe names a model (e.g. [model] name = \"lenet300\")")
    sections = {name: build(cls, table.get(name, {}), name) for name, cls in SECTIONS.items()
                if name != "data" or "data" in table}
    stages = build_stages(table.get("stages", {}))
    if "data" not in table:
        check_data_free(stages)
    return Recipe(run=sections["run"], model=sections["model"], data=sections.get("data"),
                  pretrain=sections["pretrain"], stages=stages, source=table, path=path)


def check_data_free(stages: tuple[Stage, ...]) -> None:
    """Refuse, before anything runs, a stage that needs data in a recipe without ``[data]``."""
    for stage in stages:
        if stage.spec.needs_data:
            raise RecipeError(f"stages.{stage.name}", "needs a dataset; add a [data] section")
        for f in dataclasses.fields(stage.config):  # retrain, finetune: training needs data
            value = getattr(stage.config, f.name)
            if isinstance(value, TrainConfig) and value.epochs > 0:
                raise RecipeError(f"stages.{stage.name}.{f.name}.epochs",
                                  f"{value.epochs} epochs of training needs a dataset; set it to 0 or add [data]")


def build_stages(table: Any) -> tuple[Stage, ...]:
    """``[stages.<name>]`` tables, in the order the recipe lists them (TOML keeps order)."""
    if not isinstance(table, dict):
        raise RecipeError("stages", f"must be a table of stage tables, got {type_name(table)}")
    stages = []
    for name, body in table.items():
        key = f"stages.{name}"
        if name not in REGISTRY:
            raise RecipeError(key, f"unknown stage; allowed: {', '.join(REGISTRY)}")
        if not isinstance(body, dict):
            raise RecipeError(key, f"must be a table, got {type_name(body)}")
        methods = REGISTRY[name]
        method = body.get("method", next(iter(methods)))
        if method not in methods:
            raise RecipeError(f"{key}.method", f"unknown method {method!r}; allowed: {', '.join(methods)}")
        spec = methods[method]
        fields = {k: v for k, v in body.items() if k != "method"}
        stages.append(Stage(name, spec, build(spec.config, fields, key)))
    order = [s.name for s in stages]
    for before, after in (("prune", "quantize"), ("quantize", "encode"), ("prune", "encode")):
        if before in order and after in order and order.index(before) > order.index(after):
            raise RecipeError(f"stages.{before}", f"must come before stages.{after}")
    if "encode" in order and "quantize" not in order:
        raise RecipeError("stages.encode", "needs a [stages.quantize] before it (method kmeans, linear or adaround): "
                                           "it encodes the quantized weights")
    return tuple(stages)


def build(cls: type, table: Any, key: str) -> Any:
    """Build the frozen dataclass ``cls`` from a TOML table, checking keys and types.

    A field named ``layers`` holds per-pattern overrides: ``{pattern: {field: value}}``,
    each validated against ``cls``'s own fields.
    """
    if not isinstance(table, dict):
        raise RecipeError(key, f"must be a table, got {type_name(table)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in table if k not in fields]
    if unknown:
        raise RecipeError(join(key, unknown[0]), f"unknown key; allowed: {', '.join(fields)}")
    values = {}
    for name, value in table.items():
        if name == "layers":
            values[name] = build_layers(cls, value, join(key, name))
        else:
            values[name] = convert(value, hints[name], join(key, name))
    try:
        return cls(**values)
    except RecipeError as e:
        raise RecipeError(join(key, e.key), e.message) from None


def build_layers(cls: type, table: Any, key: str) -> dict[str, dict]:
    """Per-pattern overrides; every overridden key must be a per-tensor field of ``cls``."""
    if not isinstance(table, dict):
        raise RecipeError(key, f"must be a table of pattern = {{ key = value }}, got {type_name(table)}")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls) if f.name not in NOT_PER_TENSOR]
    layers = {}
    for pattern, body in table.items():
        pkey = f'{key}."{pattern}"'
        if not isinstance(body, dict):
            raise RecipeError(pkey, f"must be a table of overrides, got {type_name(body)}")
        for name in body:
            if name not in allowed:
                raise RecipeError(join(pkey, name), f"cannot be set per tensor; allowed: {', '.join(allowed)}")
        layers[pattern] = {name: convert(v, hints[name], join(pkey, name)) for name, v in body.items()}
    return layers


NOT_PER_TENSOR = {"include", "exclude", "layers", "scope", "finetune", "retrain", "rounds", "seed"}


def convert(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` (from TOML) against the type hint and convert it (enums, tuples, nested configs)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        for member in members:
            if member is type(None):
                continue
            try:
                return convert(value, member, key)
            except RecipeError:
                pass
        raise RecipeError(key, f"expected {' or '.join(hint_name(m) for m in members if m is not type(None))}, "
                               f"got {type_name(value)} {value!r}")
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value in allowed:
            return value
        raise RecipeError(key, f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    if origin is tuple:
        if not isinstance(value, list):
            raise RecipeError(key, f"expected a list, got {type_name(value)} {value!r}")
        (item,) = typing.get_args(hint)[:1]
        return tuple(convert(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(key, f"expected a table, got {type_name(value)}")
        return dict(value)
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in hint)
            raise RecipeError(key, f"unknown value {value!r}; allowed: {allowed}") from None
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    raise RecipeError(key, f"expected {hint_name(hint)}, got {type_name(value)} {value!r}")


def apply_override(table: dict, item: str) -> None:
    """Apply one ``--set key.path=value`` to the raw TOML table."""
    path, sep, raw = item.partition("=")
    if not sep or not path:
        raise RecipeError("--set", f"expected key.path=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word: take it as a string
    keys = path.strip().split(".")
    node = table
    for i, k in enumerate(keys[:-1]):
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise RecipeError(".".join(keys[: i + 1]), "is a value, not a table; cannot set a key inside it")
    node[keys[-1]] = value


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def type_name(value: Any) -> str:
    return {dict: "table", list: "list", str: "string", bool: "boolean", int: "integer", float: "float"}.get(
        type(value), type(value).__name__)


def hint_name(hint: Any) -> str:
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in hint)
    if typing.get_origin(hint) is tuple:
        return f"a list of {hint_name(typing.get_args(hint)[0])}"
    if typing.get_origin(hint) is typing.Literal:
        return " or ".join(repr(a) for a in typing.get_args(hint))
    return {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}.get(hint, str(hint))


def to_toml(table: dict) -> str:
    """Write a recipe table back as TOML (for the run folder's resolved recipe)."""
    lines: list[str] = []

    def emit(node: dict, prefix: str) -> None:
        scalars = {k: v for k, v in node.items() if not isinstance(v, dict)}
        tables = {k: v for k, v in node.items() if isinstance(v, dict)}
        if scalars or not tables:
            if prefix:
                lines.append(f"[{prefix}]")
            lines.extend(f"{toml_key(k)} = {toml_value(v)}" for k, v in scalars.items())
            lines.append("")
        for k, v in tables.items():
            emit(v, f"{prefix}.{toml_key(k)}" if prefix else toml_key(k))

    emit(table, "")
    return "\n".join(lines).lstrip("\n")


def toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else '"' + key.replace('"', '\\"') + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")
