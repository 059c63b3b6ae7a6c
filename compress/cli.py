"""What the command-line entry points share: error handling, the plan printed by ``--check``."""
from __future__ import annotations

import dataclasses
import logging
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Callable

from compress.errors import CompressError, OutputError

QUICKSTART = "quickstart.toml"


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is so that it unwinds like Ctrl-C (files closed, lock released)."""


def guarded(fn: Callable[[], int | None], interrupted: str = "interrupted") -> int:
    """Run ``fn``; turn every failure into one line on stderr and an exit code.

    Exit codes: 2 bad input (``CompressError``), 1 runtime failure (a full disk, a bug),
    130 Ctrl-C (SIGINT), 143 SIGTERM. Files are written atomically, so a stop at any
    point leaves every artifact whole or absent.

    Under torchrun, rank 0 reports bad input and interruptions; the other ranks, which meet
    the same recipe and files, exit quietly with the same code, as they do when rank 0
    failed in work only it does. A runtime failure of another rank is its own: it is
    printed, marked with the rank.

    Args:
        interrupted: the line printed when stopped by SIGINT or SIGTERM.
    """
    from compress.distributed import PeerError, env_ranks

    try:
        rank = env_ranks()[0]
    except CompressError:
        rank = 0  # a malformed RANK is reported by the run itself
    mark = f"[rank {rank}] " if rank else ""
    previous = _on_sigterm()
    try:
        return fn() or 0
    except PeerError as e:
        return e.exit_code
    except CompressError as e:
        if not rank:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        signum = signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT
        if not rank:
            print(f"{interrupted} ({signum.name})", file=sys.stderr)
        return 128 + signum
    except OutputError as e:  # disk full, quota, read-only: the file it would have replaced is intact
        log_traceback()
        print(f"{mark}error: cannot write {e.filename}: {e.strerror}; the files already there are intact",
              file=sys.stderr)
        return 1
    except Exception as e:  # a bug or a fault (CUDA ...): one line here, the traceback in the run's log
        log_traceback()
        print(f"{mark}error: {e.__class__.__name__}: {e}", file=sys.stderr)
        return 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """Make SIGTERM raise ``Terminated``; returns the handler it replaced (None off the main thread)."""
    def terminate(signum, frame):
        raise Terminated()

    try:
        return signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # signal handlers can only be set from the main thread
        return None


def log_traceback() -> None:
    """Write the current exception's traceback to the run's log file only (the console gets one line)."""
    log = logging.getLogger("compress")
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "internal failure", None, sys.exc_info())
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_recipe(path: str | None, out: Path | None, check: bool, resume: bool, overrides: list[str]) -> int:
    from compress import pipeline, recipe

    if path is None:
        with resources.as_file(resources.files("compress") / QUICKSTART) as embedded:
            loaded = recipe.load(embedded, overrides)
    else:
        loaded = recipe.load(path, overrides)
    if check:
        print(plan(loaded))
        return 0
    result = pipeline.run(loaded, out=out, resume=resume, overrides=tuple(overrides))
    if result.rank != 0:
        return 0  # rank 0 prints the summary
    r = result.report
    summary = f"done: {result.run_dir}/report.md"
    if "ratio" in r:
        summary += (f" | {r['file']}: {r['file_bytes']:,} bytes, {r['ratio']:.1f}x smaller, "
                    f"accuracy {r['final_accuracy']:.2f}% (baseline {r['baseline_accuracy']:.2f}%)"
                    if r.get("final_accuracy") is not None else f" | {r['file']}: {r['ratio']:.1f}x smaller")
    elif r.get("final_accuracy") is not None:
        summary += f" | accuracy {r['final_accuracy']:.2f}% (baseline {r['baseline_accuracy']:.2f}%)"
    print(summary)
    return 0


def plan(loaded) -> str:
    """Which tensors each stage touches, with shapes and per-tensor settings; builds the model, trains nothing."""
    from compress import data as data_mod
    from compress import pipeline

    datasets = data_mod.load(loaded.data, seed=loaded.run.seed) if loaded.data else None
    model = pipeline.build_model(loaded, datasets)
    pipeline.validate(loaded, model)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    lines = [f"recipe {loaded.path}: run {loaded.run.name!r}, model {loaded.model.name}, "
             f"data {loaded.data.name.value if loaded.data else 'none'}, {sum(p.numel() for p in model.parameters()):,} parameters",
             f"baseline: {'checkpoint ' + loaded.model.checkpoint if loaded.model.checkpoint else f'pretrain {loaded.pretrain.epochs} epochs'}"]
    for stage in loaded.stages:
        lines.append(f"stage {stage.name} ({stage.spec.method}):")
        select = getattr(stage.config, "select", None)
        if select is None:
            continue
        for name, cfg in select(model).items():
            settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                        if f.name not in ("include", "exclude", "layers")
                        and not dataclasses.is_dataclass(getattr(cfg, f.name)) and getattr(cfg, f.name) is not None}
            if hasattr(cfg, "bits_for"):  # show what an unset bits resolves to (8 for conv, 5 for fc)
                settings["bits"] = cfg.bits_for(model, name)
            shown = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in settings.items())
            lines.append(f"  {name:<40} {'x'.join(map(str, shapes[name])):<16} {shown}")
    return "\n".join(lines)


def decode_file(path: Path, output: Path, allow_elements: int = 0) -> int:
    import io

    import torch

    from compress import modelfile
    from compress.errors import InputError
    from compress.report import write_atomic

    if not path.is_file():
        raise InputError(f"{path}: no such file")
    if not output.resolve().parent.is_dir():
        raise InputError(f"{output}: cannot write (no folder {output.parent})")
    state = modelfile.decode(path, allow_elements=allow_elements)
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(output, buf.getvalue())
    print(f"wrote {output}: {len(state)} tensors")
    return 0
