"""Full-size torchvision models through prune -> k-means -> encode -> decode on the CPU: time and peak memory.

``python -m compress.bench fullsize`` (``--size tiny``: SqueezeNet 1.1, seconds). Each model
runs in a fresh process with random weights (nothing can be downloaded here) and 1000
classes, through the same stage functions a data-free recipe runs:

    [model] name = "torchvision:<arch>"
    [stages.prune]    sparsity = 0.9, retrain = { epochs = 0 }     # per tensor, one shot
    [stages.quantize] method = "kmeans", finetune = { epochs = 0 }  # 8 bits conv, 5 bits fc
    [stages.encode]   compare = false

then decodes the file into a freshly built model (after the original is freed) and checks
it bit for bit against checksums of the encoded weights. It then runs the same recipe
through ``pipeline.run`` (what ``python -m compress.run`` does: stage checkpoints, the
file, its verification, the report) in another fresh process and measures that too.

Peak memory of a stage: the highest resident set size while it runs (``VmHWM``, reset
before each stage through ``/proc/self/clear_refs``, after freed heap is handed back to
the OS) less the resident set before the model was built, so it counts the model, masks,
records and every temporary of the stage, and nothing of Python, torch and the kernels
and caches that the model's first forward pass loads (the baseline is taken after one
build of the model, which runs a forward pass to check shapes, and its release). It is compared with the dense float32
size of the model's parameters.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import logging
import multiprocessing
import tempfile
import time
from pathlib import Path

import torch

from compress import bench, memory

MODELS = {bench.Size.TINY: ("squeezenet1_1",), bench.Size.FULL: ("resnet18", "vgg16", "mobilenet_v2")}
SPARSITY = 0.9
STAGES = ("build", "prune", "k-means", "encode", "decode")
MB = 2 ** 20


def recipe_table(arch: str) -> dict:
    """The data-free recipe the stages are configured from."""
    return {"run": {"name": "fullsize"}, "model": {"name": f"torchvision:{arch}"},
            "stages": {"prune": {"sparsity": SPARSITY, "retrain": {"epochs": 0}},
                       "quantize": {"method": "kmeans", "finetune": {"epochs": 0}},
                       "encode": {"compare": False}}}


# --- memory --------------------------------------------------------------------------------------------

def rss() -> int:
    """Resident set size of this process, bytes."""
    return memory.status_bytes("VmRSS") or 0


def release_free_memory() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc's malloc_trim), so a stage starts from what is live.

    Without it, memory a previous stage freed but the allocator kept would count against the next one.
    """
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figures are then a little higher, never lower
        pass


def peak() -> int:
    """Peak resident set size since the last ``memory.reset_rss_peak``, bytes."""
    return memory.read_peak() or 0


class Meter:
    """Wall time and peak memory (above a baseline) of each stage."""

    def __init__(self):
        release_free_memory()
        self.baseline = rss()
        self.rows: dict[str, dict] = {}
        self.exact = True

    def stage(self, name: str, fn):
        release_free_memory()
        self.exact &= memory.reset_rss_peak()
        t0 = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t0
        self.rows[name] = {"seconds": seconds, "peak_bytes": peak() - self.baseline}
        return out


# --- one model, in its own process -----------------------------------------------------------------------

def measure(arch: str, out_dir: str, threads: int) -> dict:
    """Run one model through the stages and return its figures (runs in a child process)."""
    from compress import modelfile, models, recipe
    from compress.stages import Context, State

    torch.set_num_threads(threads)
    r = recipe.from_dict(recipe_table(arch))
    stages = {s.name: s for s in r.stages}
    warm_up(r.model)
    meter = Meter()
    torch.manual_seed(0)
    model = meter.stage("build", lambda: models.build(r.model, (3, 224, 224), 1000))
    params = sum(p.numel() for p in model.parameters())
    dense = 4 * params
    state = State()
    ctx = Context(data=None, device=torch.device("cpu"), seed=0, run_dir=Path(out_dir),
                  log=logging.getLogger("compress.bench"), recipe=r)
    for name, key in (("prune", "prune"), ("k-means", "quantize"), ("encode", "encode")):
        spec = stages[key]
        meter.stage(name, lambda spec=spec, model=model, state=state: spec.spec.run(model, state, spec.config, ctx))
    path = state.file
    digests = {k: digest(v) for k, v in model.state_dict().items()}
    kept = sum(r.positions.size for r in state.records.values())
    shared = sum(r.numel for r in state.records.values())
    del model, state
    fresh = models.build(r.model, (3, 224, 224), 1000)  # what a user loading the file starts from
    meter.stage("decode", lambda: modelfile.load_into(fresh, path))
    bit_exact = all(digest(v) == digests[k] for k, v in fresh.state_dict().items())
    return {"arch": arch, "parameters": params, "dense_bytes": dense, "file_bytes": path.stat().st_size,
            "ratio": dense / path.stat().st_size, "density": kept / shared, "bit_exact": bit_exact,
            "stages": meter.rows, "peak_is_per_stage": meter.exact, "threads": threads,
            "baseline_rss_bytes": meter.baseline}


def measure_pipeline(arch: str, out_dir: str, threads: int) -> dict:
    """The whole data-free run (``pipeline.run``: checkpoints, file, verification, report) on one model."""
    from compress import pipeline, recipe, report

    torch.set_num_threads(threads)
    table = recipe_table(arch)
    table["run"]["threads"] = threads
    r = recipe.from_dict(table)
    warm_up(r.model)
    report.pyplot()  # matplotlib (~40 MB of library), which the report's plots load
    meter = Meter()
    result = meter.stage("pipeline", lambda: pipeline.run(r, out=Path(out_dir) / "run"))
    return {"arch": arch, "dense_bytes": result.report["dense_bytes"], "ratio": result.report["ratio"],
            "bit_exact": result.report["bit_exact"], **meter.rows["pipeline"], "peak_is_per_stage": meter.exact}


def warm_up(config) -> None:
    """Build the model once and free it, so the baseline includes what its first build loads for good:
    torchvision, and the compute kernels and caches of the forward pass ``models.build`` checks shapes with."""
    from compress import models

    models.build(config, (3, 224, 224), 1000)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def _child(fn, arch: str, out_dir: str, threads: int, queue) -> None:
    try:
        queue.put(fn(arch, out_dir, threads))
    except BaseException as e:  # noqa: BLE001 -- report, do not hang the parent
        queue.put({"arch": arch, "error": f"{type(e).__name__}: {e}"})


def in_fresh_process(fn, arch: str, out_dir: str, threads: int) -> dict:
    """``fn(arch, out_dir, threads)`` in a new process, so each model's baseline and peak are its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(fn, arch, out_dir, threads, queue))
    proc.start()
    result = queue.get()
    proc.join()
    if "error" in result:
        raise RuntimeError(f"fullsize {arch}: {result['error']}")
    return result


# --- the benchmark -------------------------------------------------------------------------------------------

@bench.register("fullsize")
def fullsize(size: bench.Size, out: Path) -> bench.Result:
    """Full-size torchvision models: prune, k-means, encode, decode; wall time and peak memory per stage."""
    threads = torch.get_num_threads()
    results, runs = [], []
    for arch in MODELS[size]:
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            results.append(in_fresh_process(measure, arch, tmp, threads))
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            runs.append(in_fresh_process(measure_pipeline, arch, tmp, threads))
    rows = []
    for res in results:
        dense = res["dense_bytes"]
        for stage in STAGES:
            row = res["stages"][stage]
            rows.append([f"{res['arch']} ({res['parameters'] / 1e6:.1f} M, {dense / MB:.0f} MB)" if stage == "build"
                         else "", stage, f"{row['seconds']:.2f}", f"{row['peak_bytes'] / MB:.0f}",
                         f"{row['peak_bytes'] / dense:.2f}x"])
    files = [[r["arch"], f"{r['file_bytes']:,}", f"{r['ratio']:.1f}x", f"{100 * r['density']:.1f} %",
              "yes" if r["bit_exact"] else "NO"] for r in results]
    whole = [[r["arch"], f"{r['seconds']:.1f}", f"{r['peak_bytes'] / MB:.0f}", f"{r['peak_bytes'] / r['dense_bytes']:.2f}x",
              f"{r['ratio']:.1f}x", "yes" if r["bit_exact"] else "NO"] for r in runs]
    worst = max(row["peak_bytes"] / r["dense_bytes"] for r in results for row in r["stages"].values())
    notes = [f"Random weights, 1000 classes, 224x224 inputs; prune {SPARSITY:.0%} of every conv/fc weight tensor "
             f"(one shot), k-means 8 bits conv / 5 bits fc, no fine-tuning (no data), Huffman coding. "
             f"{threads} torch threads; each model in a fresh process.",
             "Peak = highest resident set during the stage minus the resident set before the model was built "
             "(model, masks, records and temporaries; not Python, torch, nor the kernels and caches loaded by a "
             "first build and forward pass of the same model, which is done and freed before the baseline), and as "
             f"a multiple of the dense float32 size of the parameters. Highest of all: {worst:.2f}x."
             + ("" if all(r["peak_is_per_stage"] for r in results) else
                " (/proc/self/clear_refs was not writable: peaks are cumulative since the build.)"),
             "Decode builds a fresh model after the original is freed and loads the file into it one tensor at a "
             "time; 'bit-exact' compares it with SHA-256 digests of the encoded model's tensors.",
             "Ratios are for random weights pruned by magnitude; trained weights give other code statistics."]
    return bench.Result(
        figures={"models": results, "runs": runs, "sparsity": SPARSITY, "threads": threads,
                 "worst_peak_over_dense": worst},
        tables=[("Wall time and peak memory per stage", bench.table(
                    ["model (parameters, dense size)", "stage", "seconds", "peak MB", "peak / dense"], rows)),
                ("The written files", bench.table(["model", "file bytes", "ratio", "weights kept", "bit-exact"],
                                                  files)),
                ("The whole run (pipeline.run of the same data-free recipe: checkpoints, file, verification, report)",
                 bench.table(["model", "seconds", "peak MB", "peak / dense", "ratio", "bit-exact"], whole))],
        notes=notes)
