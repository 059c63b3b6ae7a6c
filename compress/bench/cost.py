"""Pipeline cost: wall time and peak memory of every stage of the quick-start and both LeNet recipes.

    python -m compress.bench cost [--size tiny|full]

Each recipe runs from scratch (pretraining included, nothing resumed) as
``python -m compress.run RECIPE --out DIR`` in a fresh process, so that its
memory is its own; the quick-start runs three times (median seconds per stage),
the LeNets once (minutes each). Seconds per stage are the pipeline's own timings
(the stage alone; the accuracy evaluation after it is not counted); peak memory
is the process's resident set size during the stage: the pipeline resets the
kernel's peak counter at each stage's start (``/proc/self/clear_refs``) and reads
``VmHWM`` at its end (``compress/memory.py``), torch, the dataset and the model
included. The process's own wall time and peak RSS (``wait4``, and the run's own figure, which
survives the resets) include interpreter start-up, imports, data loading, evaluations and reports.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from compress import bench
from compress.bench import Result, Size, _recipes
from compress.errors import InputError

RUNS = {"quickstart": "quickstart.toml", **_recipes.LENETS}
REPEATS = {"quickstart": 3}  # the others run once: minutes each
TINY_QUICKSTART = ("pretrain.epochs=5", "stages.prune.rounds=1", "stages.prune.retrain.epochs=1",
                   "stages.quantize.finetune.epochs=1")
STAGES = ("baseline", "prune", "quantize", "encode", "verify")


@bench.register("cost")
def cost(size: Size, out: Path) -> Result:
    """Wall time and peak memory of every stage of the quick-start and both LeNet recipes (fresh processes)."""
    result = Result()
    for name in _recipes.selected(list(RUNS)):
        repeats = REPEATS.get(name, 1) if size is Size.FULL else 1
        runs = [run_once(name, size, out / "runs" / f"{name}-{i + 1}") for i in range(repeats)]
        result.figures[name] = summarize(name, runs)
    result.tables.append(("Wall time and peak memory per stage", stage_table(result.figures)))
    result.notes += [
        "- seconds: the stage alone (median over the runs where repeated); peak RSS: the process's resident set "
        "size at its highest during the stage (reset at the stage's start), with torch, the dataset and the "
        "model already in memory; 'at start' is the RSS when the stage began, so the difference is what the "
        "stage itself added.",
        "- 'whole process': the `python -m compress.run` process from start to exit (interpreter start-up, imports, "
        "data loading, evaluation after each stage, reports and plots included), and its peak RSS: the highest of "
        "wait4's figure and the run's own (`peak_rss_bytes` in report.json), since the pipeline's per-stage reset "
        "of the kernel's counter also resets the figure wait4 reports.",
        "- verify: decoding the written file into a fresh model, checking it bit for bit, and evaluating it.",
        f"- load average: the machine's 1-minute load before → after each run, out of {os.cpu_count()} cores; "
        "above that, other processes shared the cores and the seconds are inflated accordingly.",
    ]
    return result


def command(name: str, size: Size, run_dir: Path) -> list[str]:
    """The ``python -m compress.run`` command line of one run."""
    recipe = _recipes.RECIPES / RUNS[name]
    if not recipe.is_file():
        raise InputError(f"recipe {recipe}: not found; run the benchmarks from a checkout of the repository")
    sets: tuple[str, ...] = ()
    if size is Size.TINY:
        sets = TINY_QUICKSTART if name == "quickstart" else (*_recipes.TINY, *([_recipes.TINY_MODEL[name]]
                                                                               if name in _recipes.TINY_MODEL else ()))
    return [sys.executable, "-m", "compress.run", str(recipe), "--out", str(run_dir),
            *[arg for s in sets for arg in ("--set", s)]]


def run_once(name: str, size: Size, run_dir: Path) -> dict:
    """Run one recipe from scratch in a fresh process; its stages' figures and the process's own.

    Raises:
        InputError: the run failed (its last line of output says why).
    """
    if run_dir.exists():
        shutil.rmtree(run_dir)  # from scratch: no cached baseline, nothing to resume
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    cmd = command(name, size, run_dir)
    log = run_dir.parent / f"{run_dir.name}.log"
    load_before = os.getloadavg()[0]
    with open(log, "wb") as sink:
        started = time.perf_counter()
        child = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # wait4: this child's own peak RSS
        wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        lines = log.read_text(errors="replace").strip().splitlines()
        raise InputError(f"{name}: {' '.join(cmd[1:])} exited with {code}: {lines[-1] if lines else 'no output'}")
    report = json.loads((run_dir / "report.json").read_text())
    versions = json.loads((run_dir / "versions.json").read_text())
    stages = {}
    for s in report["stages"]:
        stages[s["stage"]] = pick(s)
        if "verify" in s:
            stages["verify"] = pick(s["verify"])
    # wait4's peak only covers the time since the pipeline's last per-stage reset; the report keeps the rest
    peak = max(usage.ru_maxrss * 1024, report.get("peak_rss_bytes") or 0)
    return {"command": " ".join(["python", *cmd[1:]]), "wall_seconds": wall, "max_rss_bytes": peak,
            "threads": versions["threads"], "load_before": load_before, "load_after": os.getloadavg()[0],
            "stages": stages, "file_bytes": report.get("file_bytes"), "ratio": report.get("ratio"),
            "final_accuracy": report.get("final_accuracy")}


def pick(entry: dict) -> dict:
    keys = ("seconds", "peak_rss_bytes", "rss_start_bytes", "peak_rss_scope", "peak_cuda_bytes", "method")
    return {k: entry[k] for k in keys if k in entry}


def summarize(name: str, runs: list[dict]) -> dict:
    """Median seconds per stage over the runs, highest peaks; every run kept in ``runs``."""
    stages = {}
    for stage in STAGES:
        seen = [r["stages"][stage] for r in runs if stage in r["stages"]]
        if seen:
            stages[stage] = {
                "seconds": statistics.median(s["seconds"] for s in seen),
                "peak_rss_bytes": max((s.get("peak_rss_bytes") or 0 for s in seen), default=None) or None,
                "rss_start_bytes": statistics.median(s.get("rss_start_bytes") or 0 for s in seen) or None,
                "peak_rss_scope": seen[0].get("peak_rss_scope"),
                "method": seen[0].get("method")}
    return {"name": name, "runs": runs, "stages": stages,
            "wall_seconds": statistics.median(r["wall_seconds"] for r in runs),
            "max_rss_bytes": max(r["max_rss_bytes"] for r in runs), "threads": runs[0]["threads"],
            "command": runs[0]["command"]}


def mb(n: int | float | None) -> str:
    return "–" if n is None else f"{n / 1e6:,.0f}"


def stage_table(figures: dict) -> str:
    header = ["run", "stage", "seconds", "peak RSS MB", "RSS at start MB"]
    rows = []
    for f in figures.values():
        label = f"{_recipes.NAMES[f['name']]} ({len(f['runs'])} run{'s' if len(f['runs']) > 1 else ''}, " \
                f"{f['threads']} threads)"
        for stage, s in f["stages"].items():
            rows.append([label, f"{stage} ({s['method']})" if s.get("method") else stage, f"{s['seconds']:.2f}",
                         mb(s["peak_rss_bytes"]), mb(s["rss_start_bytes"])])
            label = ""
        load = ", ".join(f"{r['load_before']:.1f}→{r['load_after']:.1f}" for r in f["runs"])
        rows.append(["", f"**whole process** (load average {load})", f"**{f['wall_seconds']:.2f}**",
                     mb(f["max_rss_bytes"]), ""])
    return bench.table(header, rows)


__all__ = ["cost", "command", "run_once", "summarize"]
