"""Benchmarks: ``python -m compress.bench NAME [--size tiny|full] [--out DIR]``.

A benchmark is a function registered under a name in a module of this package;
it gets a ``Size`` (``tiny`` proves in seconds that it works, for the test suite;
``full`` gives the published figures) and its output folder, writes any PNG it
draws there, and returns a ``Result``. The runner stamps the machine (cores,
torch version, threads, date) and writes ``result.json`` and ``result.md``
atomically into ``artifacts/bench/<name>/``. Modules are found by
``pkgutil``, so adding a benchmark is adding a module.
"""
from __future__ import annotations

import datetime
import enum
import importlib
import json
import os
import pkgutil
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ARTIFACTS = Path("artifacts") / "bench"


class Size(str, enum.Enum):
    TINY = "tiny"  # seconds: the test suite runs every benchmark at this size
    FULL = "full"  # the figures BENCHMARKS.md quotes


@dataclass
class Result:
    """What a benchmark measured.

    Attributes:
        figures: JSON-able measurements (the machine-readable record).
        tables: ``(title, markdown table)`` pairs for ``result.md`` and BENCHMARKS.md.
        notes: sentences printed under the tables (what was measured, how, caveats).
        files: names of the extra files (plots) written into the output folder.
    """

    figures: dict[str, Any] = field(default_factory=dict)
    tables: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


Benchmark = Callable[[Size, Path], Result]
REGISTRY: dict[str, tuple[Benchmark, str]] = {}


def register(name: str):
    """Decorator: register ``fn(size, out_dir) -> Result`` as benchmark ``name`` (its docstring's first
    line is its description in ``--list``)."""

    def decorate(fn: Benchmark) -> Benchmark:
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = (fn, doc[0] if doc else "")
        return fn

    return decorate


def discover() -> dict[str, tuple[Benchmark, str]]:
    """Import every module of this package (registering its benchmarks) and return the registry."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return REGISTRY


def machine() -> dict[str, Any]:
    """Where and when the figures were measured."""
    import torch

    return {"date": datetime.date.today().isoformat(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def markdown(name: str, size: Size, result: Result, stamp: dict[str, Any], command: str) -> str:
    lines = [f"# Benchmark `{name}` ({size.value})", "",
             f"Command: `{command}`", "",
             f"Machine: {stamp['cores']} cores, {stamp['threads']} torch threads, Python {stamp['python']}, "
             f"torch {stamp['torch']}{', ' + stamp['cuda'] if stamp['cuda'] else ''}; {stamp['date']}.", ""]
    for title, table in result.tables:
        lines += [f"## {title}", "", table.rstrip(), ""]
    lines += [*result.notes, ""] if result.notes else []
    return "\n".join(lines)


def run(name: str, size: Size = Size.FULL, out: Path | None = None, command: str = "") -> tuple[Path, Result]:
    """Run benchmark ``name`` and write ``result.json`` / ``result.md`` (plus its plots) into ``out``.

    Raises:
        InputError: an unknown benchmark name (listing the known ones), or an unwritable output folder.
    """
    from compress.errors import InputError
    from compress.report import jsonable, write_atomic

    registry = discover()
    if name not in registry:
        raise InputError(f"unknown benchmark {name!r}; known: {', '.join(sorted(registry))}")
    out = Path(out) if out is not None else ARTIFACTS / name
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder {out}: cannot create ({e.strerror})") from None
    fn, _ = registry[name]
    result = fn(Size(size), out)
    stamp = machine()
    command = command or f"python -m compress.bench {name} --size {Size(size).value}"
    record = {"benchmark": name, "size": Size(size).value, "command": command, "machine": stamp,
              "figures": result.figures, "files": result.files}
    write_atomic(out / "result.json", json.dumps(record, indent=2, default=jsonable))
    write_atomic(out / "result.md", markdown(name, Size(size), result, stamp, command))
    return out, result


def table(header: list[str], rows: list[list[Any]]) -> str:
    """A Markdown table; floats are written as given (format them before)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


__all__ = ["Size", "Result", "register", "discover", "run", "table", "machine", "ARTIFACTS"]
