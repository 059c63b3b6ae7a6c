"""Nearest rounding vs AdaRound on the same grid and baseline, several bit widths and seeds: mean ± std.

    python benchmarks/adaround_seeds.py --nearest recipes/lenet5_nearest_fashion.toml \\
        --adaround recipes/lenet5_adaround_fashion.toml --seeds 0 1 2 --bits 4 3 2 --jobs 2 \\
        --out artifacts/adaround/lenet5

One float baseline per model, as in the AdaRound paper's mean ± std over runs: the first run
(nearest rounding at the first width) trains it, and its cached ``pretrain.pt`` is copied into every
other run folder (the pipeline checks that model, data, pretraining and seed match). Nearest rounding
is deterministic given the baseline and the grid, so it runs once per width; AdaRound runs once per
width and seed, the seed (``stages.quantize.seed``) drawing the calibration samples and the batch order.
Runs: ``python -m compress.run RECIPE --set stages.quantize.bits=B [--set stages.quantize.seed=S]
--out OUT/{nearest-bB,adaround-bB-sS}``; accuracy is that of the decoded ``.dcz`` file.
``--table-only`` rebuilds the table from finished runs. Writes ``OUT/table.md`` and ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

def nearest_dir(out: Path, bits: int) -> Path:
    return out / f"nearest-b{bits}"


def adaround_dir(out: Path, bits: int, seed: int) -> Path:
    return out / f"adaround-b{bits}-s{seed}"


def compress_run(recipe: str, folder: Path, sets: list[str]) -> None:
    cmd = [sys.executable, "-m", "compress.run", recipe, "--out", str(folder)]
    for s in sets:
        cmd += ["--set", s]
    folder.mkdir(parents=True, exist_ok=True)
    log = folder.parent / f"{folder.name}.log"
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")


def run_all(args) -> None:
    first = nearest_dir(args.out, args.bits[0])
    if not (first / "report.json").exists():  # trains the baseline
        compress_run(args.nearest, first, args.set + [f"stages.quantize.bits={args.bits[0]}"])
    todo = [(args.nearest, nearest_dir(args.out, b), [f"stages.quantize.bits={b}"]) for b in args.bits[1:]]
    todo += [(args.adaround, adaround_dir(args.out, b, s), [f"stages.quantize.bits={b}", f"stages.quantize.seed={s}",
                                                           *args.adaround_set])
             for s in args.seeds for b in args.bits]
    todo = [t for t in todo if not (t[1] / "report.json").exists()]
    for _, folder, _ in todo:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy2(first / "pretrain.pt", folder / "pretrain.pt")
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda t: compress_run(t[0], t[1], args.set + t[2]), todo))


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def stage_seconds(report: dict) -> float:
    return next(s["seconds"] for s in report["stages"] if s["stage"] == "quantize")


def summarise(out: Path, seeds: list[int], bits: list[int]) -> tuple[dict, str]:
    """Per width: float, nearest and per-seed AdaRound accuracy, per-layer MSE and seconds; Markdown tables."""
    load = lambda folder: json.loads((folder / "report.json").read_text())  # noqa: E731
    summary: dict = {"seeds": seeds, "bits": {}}
    head = ["| bits | float % | nearest % | AdaRound % | AdaRound − float | AdaRound − nearest | AdaRound stage s |",
            "|---|---|---|---|---|---|---|"]
    layer_rows = ["| bits | layer | MSE nearest | MSE AdaRound | AdaRound / nearest | flipped | seconds |",
                  "|---|---|---|---|---|---|---|"]
    for b in bits:
        near = load(nearest_dir(out, b))
        ada = [load(adaround_dir(out, b, s)) for s in seeds]
        base = near["baseline_accuracy"]
        if any(r["baseline_accuracy"] != base for r in ada):
            raise RuntimeError(f"bits {b}: the runs do not share one baseline")
        acc = [r["final_accuracy"] for r in ada]
        gap_f = [a - base for a in acc]
        gap_n = [a - near["final_accuracy"] for a in acc]
        seconds = [stage_seconds(r) for r in ada]
        layers = {}
        for name in ada[0]["stage_figures"]["quantize"]["layers"]:
            per = [r["stage_figures"]["quantize"]["layers"][name] for r in ada]
            layers[name] = {k: [p[k] for p in per] for k in ("mse_nearest", "mse_adaround", "flipped", "seconds")}
            m = {k: statistics.mean(v) for k, v in layers[name].items()}
            worse = sum(a >= n for a, n in zip(layers[name]["mse_adaround"], layers[name]["mse_nearest"]))
            layer_rows.append(f"| {b} | {name} | {m['mse_nearest']:.5f} | {m['mse_adaround']:.5f} | "
                              f"{m['mse_adaround'] / m['mse_nearest']:.3f}{' (' + str(worse) + ' seeds not lower)' if worse else ''} | "
                              f"{100 * m['flipped']:.1f} % | {m['seconds']:.1f} |")
        summary["bits"][b] = {"float": base, "nearest": near["final_accuracy"], "adaround": acc,
                              "adaround_minus_float": gap_f, "adaround_minus_nearest": gap_n,
                              "adaround_stage_seconds": seconds, "layers": layers,
                              "file_bytes": {"nearest": near["file_bytes"], "adaround": [r["file_bytes"] for r in ada]}}
        head.append(f"| {b} | {base:.2f} | {near['final_accuracy']:.2f} | {mean_std(acc)} | "
                    f"{mean_std(gap_f)} (worst {min(gap_f):+.2f}) | {mean_std(gap_n)} (worst {min(gap_n):+.2f}) | "
                    f"{mean_std(seconds)} |")
    text = "\n".join(head) + "\n\nPer layer (means over the seeds; MSE of the layer's output, after its ReLU where one " \
                             "directly follows, on the calibration set; both roundings on the same grid and inputs):\n\n" \
        + "\n".join(layer_rows)
    return summary, text + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nearest", required=True, help="recipe quantizing by nearest rounding")
    p.add_argument("--adaround", required=True, help="the same recipe with method = \"adaround\"")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3, 2])
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (after the baseline)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], help="extra recipe override for every run")
    p.add_argument("--adaround-set", action="append", default=[], help="extra override for the AdaRound runs only")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from finished runs")
    args = p.parse_args(argv)
    if not args.table_only:
        run_all(args)
    summary, text = summarise(args.out, args.seeds, args.bits)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
