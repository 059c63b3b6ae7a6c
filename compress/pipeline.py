"""Run a recipe's stages in order: run folder, pretraining cache, stage checkpoints, resume, verification.

Every stage leaves a checkpoint (weights, masks, records) stamped with a
fingerprint of the recipe up to that stage; ``--resume`` skips a stage whose
checkpoint matches. After an encode stage the written FILE is decoded into a
fresh model and evaluated: that is the accuracy the report gives.

Under ``torchrun`` every process runs this same code (see ``compress.distributed``):
all of them train and evaluate, rank 0 alone reads checkpoints and writes files
(``distributed.on_main``), and after every stage the others take rank 0's weights,
masks and records (``distributed.share_run_state``).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import compress
from compress import data as data_mod
from compress import distributed, failpoints, memory, modelfile, models, report, rundir, train
from compress.errors import InputError, OutputError, RecipeError
from compress.record import Affine, Codebook, TensorRecord
from compress.recipe import Recipe, Stage, to_toml
from compress.stages import Context, State
from compress.stages.base import candidate_weights, get_param

ARTIFACTS = Path("artifacts")


@dataclass
class Result:
    """A finished run: its folder and report (rank 0's; empty on the other ranks), the model and state."""

    run_dir: Path
    report: dict
    model: nn.Module | None = None
    state: State | None = None
    rank: int = 0


def run(recipe: Recipe, *, out: Path | None = None, resume: bool = False,
        overrides: tuple[str, ...] = ()) -> Result:
    """Run ``recipe`` and write its run folder; one process, or each of those torchrun started.

    Rank 0 holds the folder (``rundir.RunLock``) for the run's duration and is its only writer.

    Raises:
        CompressError: bad input (recipe, files), or another run holds the folder; found before
            anything is written. The CLI reports it in one line.
        OutputError: an artifact could not be written (disk full); the previous one is intact.
        distributed.PeerError: on ranks other than 0, when rank 0 failed writing or reading files.
    """
    setup_torch(recipe)
    with distributed.started(recipe.run.device) as proc:
        return run_in(proc, recipe, out=out, resume=resume, overrides=overrides)


def run_in(proc: distributed.Process, recipe: Recipe, *, out: Path | None = None, resume: bool = False,
           overrides: tuple[str, ...] = ()) -> Result:
    """``run`` as process ``proc`` of the run."""
    run_dir = Path(out) if out is not None else ARTIFACTS / recipe.run.name
    # everything that can be checked is checked before the run folder exists: bad input leaves nothing behind
    datasets = data_mod.load(recipe.data, seed=recipe.run.seed) if recipe.data else None
    model = build_model(recipe, datasets)
    validate(recipe, model)
    if proc.world_size > 1:
        torch.manual_seed(recipe.run.seed + proc.rank)  # same weights built everywhere; dropout differs per rank
    lock = rundir.RunLock(run_dir)

    def hold() -> None:  # before anything is written: a refused run touches nothing
        make_run_dir(run_dir)
        lock.acquire()

    distributed.on_main(hold)
    try:
        return execute(proc, recipe, run_dir, datasets, model, lock, resume=resume, overrides=overrides)
    finally:
        lock.release()  # a no-op on the ranks that never held it


def execute(proc: distributed.Process, recipe: Recipe, run_dir: Path, datasets, model: nn.Module,
            lock: rundir.RunLock, *, resume: bool, overrides: tuple[str, ...]) -> Result:
    """The run proper, in a folder rank 0 holds (see ``run``)."""
    device = proc.device
    log = setup_logging(run_dir, rank=proc.rank)
    distributed.on_main(lambda: recover(run_dir, lock, log))
    ctx = Context(data=datasets, device=device, seed=recipe.run.seed, run_dir=run_dir, log=log,
                  pretrain=recipe.pretrain, recipe=recipe, rank=proc.rank, world_size=proc.world_size)

    def write_run_files() -> None:
        report.write_atomic(run_dir / "recipe.toml", to_toml(recipe.source))
        report.write_atomic(run_dir / "versions.json",
                            json.dumps(versions(recipe, overrides, proc.world_size), indent=2))

    distributed.on_main(write_run_files)
    log.info("run %s on %s%s -> %s", recipe.run.name, device,
             f" ({proc.world_size} processes)" if proc.world_size > 1 else "", run_dir)

    state = State()
    stages: list[dict] = []
    t0 = time.perf_counter()
    baseline = pretrain(model, recipe, ctx)
    stages.append(baseline)
    fingerprint = baseline["fingerprint"]
    snapshot: dict[str, torch.Tensor] = {}
    for i, stage in enumerate(recipe.stages):
        fingerprint = digest(fingerprint, stage.name, recipe.source["stages"][stage.name])
        path = run_dir / "stages" / f"{i + 1:02d}-{stage.name}.pt"
        if stage.name == "quantize" and proc.is_main:  # the kept weights before sharing, for the report's plot
            snapshot = {n: w[w != 0].cpu() for n, w in ((n, get_param(model, n).detach()) for n in candidate_weights(model))}
        loaded = distributed.on_main(lambda: load_stage(path, fingerprint, model, state)) if resume else None
        if loaded is not None:
            log.info("stage %s: resumed from %s", stage.name, path)
            entry = loaded
            entry["resumed"] = True
            distributed.share_run_state(model, state)
        else:
            entry = run_stage(stage, model, state, ctx)
            distributed.share_run_state(model, state)
            distributed.on_main(lambda: save_stage(path, fingerprint, model, state, entry))
        if state.file is not None and stage.name == "encode":
            entry["verify"] = distributed.on_main(lambda: verify(state.file, model, recipe, datasets, state, ctx))
        stages.append(entry)
    total = time.perf_counter() - t0
    if not proc.is_main:
        return Result(run_dir, {}, model, state, proc.rank)
    result = report.build(recipe, model, state, stages, snapshot, total_seconds=total)
    report.write(run_dir, result, model, snapshot, state)
    log.info("done in %.1f s; report: %s", total, run_dir / "report.md")
    return Result(run_dir, result, model, state, proc.rank)


def make_run_dir(run_dir: Path) -> None:
    try:
        (run_dir / "stages").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"output folder {run_dir}: cannot create ({e.strerror})") from None


def recover(run_dir: Path, lock: rundir.RunLock, log: logging.Logger) -> None:
    """Say what a run that died here left behind, and remove its unfinished temporary files."""
    if lock.stale:
        log.warning("cleared a stale lock of run pid %s (it ended without releasing the folder: killed?)",
                    lock.stale.get("pid", "?"))
    for path in rundir.remove_temporaries(run_dir):
        log.warning("removed %s, an unfinished write of a run that was stopped", path)


def validate(recipe: Recipe, model: nn.Module) -> None:
    """Resolve every stage's tensor selection against the model (patterns that match nothing fail here)."""
    for stage in recipe.stages:
        select = getattr(stage.config, "select", None)
        if select is not None:
            try:
                select(model)
            except RecipeError as e:
                raise RecipeError(f"stages.{stage.name}.{e.key}", e.message) from None


def run_stage(stage: Stage, model: nn.Module, state: State, ctx: Context) -> dict:
    ctx.log.info("stage %s (%s) ...", stage.name, stage.spec.method)
    seed_stage(ctx.seed, stage.name)
    mark = memory.mark()
    t0 = time.perf_counter()
    figures = stage.spec.run(model, state, stage.config, ctx) or {}
    seconds = time.perf_counter() - t0
    entry = {"stage": stage.name, "method": stage.spec.method, "seconds": seconds, "figures": figures}
    entry.update(memory.since(mark))  # the stage's own peak (evaluation below excluded, like its seconds)
    if ctx.data is not None and stage.spec.changes_weights:
        entry["accuracy"] = ctx.evaluate(model)
    ctx.log.info("stage %s: %.1f s%s", stage.name, seconds,
                 f", accuracy {entry['accuracy']:.2f}%" if "accuracy" in entry else "")
    return entry


def pretrain(model: nn.Module, recipe: Recipe, ctx: Context) -> dict:
    """Train the baseline unless a checkpoint was given; cache it in the run folder."""
    fingerprint = digest("v1", recipe.source.get("model"), recipe.source.get("data"),
                         recipe.source.get("pretrain"), recipe.run.seed)
    cache = ctx.run_dir / "pretrain.pt"
    entry: dict = {"stage": "baseline", "method": "checkpoint" if recipe.model.checkpoint else "pretrain",
                   "fingerprint": fingerprint}
    mark = memory.mark()
    t0 = time.perf_counter()
    if recipe.model.checkpoint or ctx.data is None or recipe.pretrain.epochs == 0:
        entry["method"] = "checkpoint" if recipe.model.checkpoint else "as built"
    elif distributed.on_main(lambda: load_stage(cache, fingerprint, model, State()) is not None):
        distributed.share_model(model)
        ctx.log.info("pretrain: cached baseline %s", cache)
        entry["resumed"] = True
    else:
        ctx.log.info("pretrain: %d epochs", recipe.pretrain.epochs)
        seed_stage(ctx.seed, "pretrain")
        ctx.fit(model, recipe.pretrain, seed=ctx.seed, desc="pretrain")
        distributed.on_main(lambda: save_stage(cache, fingerprint, model, State(), {"stage": "baseline"}))
    entry["seconds"] = time.perf_counter() - t0
    entry.update(memory.since(mark))
    if ctx.data is not None:
        entry["accuracy"] = ctx.evaluate(model)
        ctx.log.info("baseline accuracy %.2f%%", entry["accuracy"])
    return entry


def verify(path: Path, model: nn.Module, recipe: Recipe, datasets, state: State, ctx: Context) -> dict:
    """Decode the written file: check it fits the model and is bit-exact, and evaluate a fresh model loaded from it.

    The check decodes one tensor at a time; the fresh model is only built when there is data to
    evaluate it on, so a data-free run never holds two copies of a large model.
    """
    mark, t0 = memory.mark(), time.perf_counter()
    bad = modelfile.differing_in_file(model.state_dict(), path, state.records)
    if bad:
        raise RuntimeError(f"decoded tensor {bad[0]!r} differs from the evaluated weights")
    out = {"bit_exact": True, "file_bytes": path.stat().st_size}
    if datasets is not None:  # rank 0 alone (the others wait): the plain one-process evaluation
        fresh = models.build(recipe.model, *shape_of(datasets, recipe))
        modelfile.load_into(fresh, path)
        out["accuracy"] = train.evaluate(fresh, datasets, device=ctx.device,
                                         batch_size=recipe.data.eval_batch_size)
        ctx.log.info("decoded %s: accuracy %.2f%%", path.name, out["accuracy"])
    out.update(seconds=time.perf_counter() - t0, **memory.since(mark))  # decode + check + evaluation
    return out


def build_model(recipe: Recipe, datasets) -> nn.Module:
    torch.manual_seed(recipe.run.seed)
    try:
        return models.build(recipe.model, *shape_of(datasets, recipe))
    except RecipeError as e:  # models name their own keys ("name"); the recipe's key is model.name
        raise RecipeError(f"model.{e.key}" if e.key and not e.key.startswith("model") else e.key, e.message) from None


def shape_of(datasets, recipe: Recipe) -> tuple[tuple[int, int, int], int]:
    """(input shape, classes): from the data, or torchvision's ImageNet defaults for a data-free recipe."""
    if datasets is not None:
        return datasets.input_shape, datasets.num_classes
    return ((3, 224, 224), 1000) if recipe.model.name.startswith("torchvision:") else ((1, 28, 28), 10)


# --- stage checkpoints -------------------------------------------------------------------------------


def save_stage(path: Path, fingerprint: str, model: nn.Module, state: State, entry: dict) -> None:
    """Weights, masks and records of a stage, written atomically; plain tensors only (weights_only loads)."""
    obj = {"fingerprint": fingerprint, "model": model.state_dict(),
           "masks": dict(state.masks), "records": {n: record_to_dict(r) for n, r in state.records.items()},
           "folded_bn": state.folded_bn, "file": str(state.file) if state.file else "",
           "entry": json.dumps(entry, default=report.jsonable)}
    models.save_checkpoint(obj, path)


def load_stage(path: Path, fingerprint: str, model: nn.Module, state: State) -> dict | None:
    """Restore a stage checkpoint into ``model`` and ``state``; None when absent, damaged or stale."""
    if not path.exists():
        return None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code: nothing in it runs
    except Exception as e:  # noqa: BLE001 -- a damaged or refused checkpoint is simply redone
        logging.getLogger("compress").warning("%s: unreadable, redoing it (%s)", path, models.refusal_reason(e))
        return None
    if not isinstance(obj, dict) or obj.get("fingerprint") != fingerprint:
        return None
    file = Path(obj["file"]) if obj["file"] else None
    if file is not None and not file.exists():  # the model file it wrote is gone: redo the stage, model untouched
        return None
    if obj.get("folded_bn") and not state.folded_bn:
        from compress.fold import fold_batchnorm

        fold_batchnorm(model)
    model.load_state_dict(obj["model"])
    state.masks = dict(obj["masks"])
    state.records = {n: record_from_dict(d) for n, d in obj["records"].items()}
    state.folded_bn = bool(obj["folded_bn"])
    state.file = file
    return json.loads(obj["entry"])


def record_to_dict(r: TensorRecord) -> dict:
    d = {"shape": list(r.shape), "positions": torch.from_numpy(r.positions), "codes": torch.from_numpy(r.codes)}
    if isinstance(r.table, Codebook):
        d["codebook"] = torch.from_numpy(r.table.values)
    else:
        d.update(scale=torch.from_numpy(r.table.scale), zero_point=torch.from_numpy(r.table.zero_point),
                 levels=r.table.levels, per_channel=r.table.per_channel)
    return d


def record_from_dict(d: dict) -> TensorRecord:
    if "codebook" in d:
        table = Codebook(d["codebook"].numpy())
    else:
        table = Affine(d["scale"].numpy(), d["zero_point"].numpy(), int(d["levels"]), bool(d["per_channel"]))
    return TensorRecord(tuple(d["shape"]), d["positions"].numpy(), d["codes"].numpy(), table)


# --- surroundings -------------------------------------------------------------------------------------


def digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def seed_stage(seed: int, stage: str) -> None:
    """Seed the global RNGs (dropout, layer init) from the run's seed and the stage alone.

    A stage then draws the same numbers whether the stages before it ran in this process
    or were resumed from their checkpoints: what makes a resumed run byte-identical.
    """
    derived = int(digest(seed, stage), 16) % 2 ** 32
    torch.manual_seed(derived)
    np.random.seed(derived)


def setup_torch(recipe: Recipe) -> None:
    if recipe.run.threads:
        torch.set_num_threads(recipe.run.threads)
    torch.manual_seed(recipe.run.seed)
    np.random.seed(recipe.run.seed)


def setup_logging(run_dir: Path, rank: int = 0) -> logging.Logger:
    """Rank 0 logs progress to ``run.log`` and stderr; other ranks only warnings, to stderr, marked with their rank."""
    log = logging.getLogger("compress")
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for h in list(log.handlers):
        log.removeHandler(h)
        h.close()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    if rank == 0:
        try:
            file = QuietFileHandler(run_dir / "run.log", mode="a", encoding="utf-8")
        except OSError as e:
            raise OutputError(e.errno, e.strerror, str(run_dir / "run.log")) from e
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(file)
    log.addHandler(console)
    failpoints.install(log)
    log.propagate = False
    return log


class QuietFileHandler(logging.FileHandler):
    """The run's log file; when it cannot be written (disk full) it stops, instead of printing tracebacks."""

    def handleError(self, record: logging.LogRecord) -> None:
        logging.getLogger("compress").removeHandler(self)
        with contextlib.suppress(OSError):
            self.close()


def versions(recipe: Recipe, overrides: tuple[str, ...], world_size: int = 1) -> dict:
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "compress": compress.__version__, "seed": recipe.run.seed, "overrides": list(overrides),
            "recipe": str(recipe.path) if recipe.path else None, "threads": torch.get_num_threads(),
            "processes": world_size}
