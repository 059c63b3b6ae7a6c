"""The run's report: ``report.json`` for machines, ``report.md`` for people, PNG plots.

Figures about the compressed model come from the written file (its size on
disk, the accuracy of the model decoded from it); nothing here is estimated
unless its label says so.
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from compress import failpoints, memory, rundir
from compress.errors import OutputError


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write to a temporary file beside ``path`` and rename it into place.

    Readers see the old file or the whole new one, never a part; a process killed
    mid-write leaves a hidden ``.<name>.*.tmp`` that the next run removes.

    Raises:
        OutputError: the write failed (disk full, quota, read-only); ``path`` is untouched.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, rundir.file_mode())  # mkstemp's 0600 would make the run's files private
        failpoints.hit(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with_suppressed(os.unlink, tmp)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(e.errno, e.strerror, str(path)) from e
        raise


def with_suppressed(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def jsonable(obj: Any) -> Any:
    """``json.dumps`` default: dataclasses, enums, paths, numpy and torch scalars."""
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return obj.tolist()
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# --- building the report ------------------------------------------------------------------------------


def build(recipe, model: nn.Module, state, stages: list[dict], snapshot: dict, *, total_seconds: float) -> dict:
    """Collect the run's figures into one JSON-ready dict."""
    params = dict(model.named_parameters())
    n_params = sum(p.numel() for p in params.values())
    encode = next((s for s in stages if s.get("stage") == "encode"), None)
    stats = {s["name"]: s for s in (jsonable_stats(encode["figures"]["tensors"]) if encode else [])}
    tensors = [tensor_row(name, p, state, stats.get(name)) for name, p in params.items()]
    baseline = stages[0].get("accuracy")
    result = {
        "run": recipe.run.name,
        "recipe": str(recipe.path) if recipe.path else None,
        "seed": recipe.run.seed,
        "data": recipe.data.name.value if recipe.data else None,
        "model": recipe.model.name,
        "total_seconds": total_seconds,
        "peak_rss_bytes": memory.process_peak_bytes(),  # the whole run so far, up to the report
        "baseline_accuracy": baseline,
        "stages": [{k: v for k, v in s.items() if k not in ("figures", "fingerprint")} for s in stages],
        "stage_figures": {s["stage"]: s.get("figures") for s in stages[1:]},
        "tensors": tensors,
        "params": n_params,
        "dense_bytes": 4 * n_params,
    }
    if recipe.data is None:
        result["note"] = "data-free recipe: no dataset, so no accuracy figures"
    if encode:
        verify = encode["verify"]
        size = verify["file_bytes"]
        other = {k: v for k, v in encode["figures"].items() if k.startswith("file_bytes_")}
        fixed = encode["figures"]["file_bytes"] if encode["figures"]["coder"] == "none" else other.get("file_bytes_none")
        huff = encode["figures"]["file_bytes"] if encode["figures"]["coder"] == "huffman" else other.get(
            "file_bytes_huffman")
        weights = [t for t in tensors if t.get("gap_symbols") is not None]
        result.update({
            "file": encode["figures"]["file"],
            "file_bytes": size,
            "ratio": 4 * n_params / size,
            "final_accuracy": verify.get("accuracy"),
            "accuracy_loss": (baseline - verify["accuracy"]) if baseline is not None and "accuracy" in verify else None,
            "bit_exact": verify["bit_exact"],
            "breakdown": {
                "pruning_only_estimate": 4 * n_params / pruning_only_bytes(tensors),
                "pruning+quantization_file": 4 * n_params / fixed if fixed else None,
                "pruning+quantization+huffman_file": 4 * n_params / huff if huff else None,
            },
            "weights_only": {
                "dense_bytes": sum(4 * t["params"] for t in weights),
                "encoded_bytes": sum(t["encoded_bytes"] for t in weights),
            },
        })
        wo = result["weights_only"]
        wo["ratio"] = wo["dense_bytes"] / max(wo["encoded_bytes"], 1)
    else:
        last = next((s["accuracy"] for s in reversed(stages) if "accuracy" in s), None)
        result["final_accuracy"] = last
    return result


def jsonable_stats(stats) -> list[dict]:
    return [json.loads(json.dumps(s, default=jsonable)) for s in stats]


def tensor_row(name: str, p: torch.Tensor, state, stat: dict | None) -> dict:
    w = p.detach().cpu()
    nonzero = int(torch.count_nonzero(w))  # counted, not summed: a mean over a float copy costs a copy of the model
    row = {"name": name, "shape": list(w.shape), "params": w.numel(), "nonzero": nonzero,
           "density": nonzero / w.numel() if w.numel() else 0.0,
           "distinct": int(torch.unique(w[w != 0]).numel())}
    record = state.records.get(name)
    if record is not None:
        row["bits"] = max(1, math.ceil(math.log2(max(record.table.size, 1))))
        row["kept"] = int(record.positions.size)
    if stat is not None:
        row["encoding"] = stat["encoding"]
        row["encoded_bytes"] = stat["header_bytes"] + stat["payload_bytes"]
        row["ratio"] = 4 * w.numel() / max(row["encoded_bytes"], 1)
    if stat is not None and stat["encoding"] != "raw":
        row.update({
            "gap_bits": stat.get("gap_bits"),
            "gap_symbols": stat.get("n_gap_symbols"),
            "huffman_bits_per_code": stat["code_stream_bits"] / max(stat["n_kept"], 1) if stat.get("n_kept") else None,
            "huffman_bits_per_gap": stat["gap_stream_bits"] / max(stat["n_gap_symbols"], 1)
            if stat.get("n_gap_symbols") else None,
            "table_bytes": stat.get("table_bytes"),
        })
    return row


def pruning_only_bytes(tensors: list[dict]) -> float:
    """Pruning alone (the paper's P column): float32 values plus fixed-width gap indices, others dense."""
    total = 0.0
    for t in tensors:
        if t.get("gap_symbols") is not None:
            total += (32 * t["kept"] + t["gap_bits"] * t["gap_symbols"]) / 8
        else:
            total += 4 * t["params"]
    return total


# --- writing it ---------------------------------------------------------------------------------------


def write(run_dir: Path, result: dict, model: nn.Module, snapshot: dict, state) -> None:
    write_atomic(run_dir / "report.json", json.dumps(result, indent=2, default=jsonable))
    write_atomic(run_dir / "report.md", markdown(result))
    stages_plot(result, run_dir / "accuracy.png")
    if state.records and snapshot:
        name = max(state.records, key=lambda n: state.records[n].positions.size)
        weights_plot(name, snapshot[name], model.state_dict()[name], run_dir / "weights.png")


def fmt(value, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def markdown(r: dict) -> str:
    lines = [f"# Run `{r['run']}`", ""]
    lines += [f"Model `{r['model']}` on `{r['data'] or 'no data'}`, seed {r['seed']}, "
              f"recipe `{r['recipe']}`, total {r['total_seconds']:.1f} s.", ""]
    if r.get("note"):
        lines += [f"Note: {r['note']}.", ""]
    if "file_bytes" in r:
        lines += ["## Model file", "",
                  f"- file: `{r['file']}`, **{r['file_bytes']:,} bytes** on disk (headers, tables, raw biases included)",
                  f"- dense float32 parameters: {r['dense_bytes']:,} bytes ({r['params']:,} parameters)",
                  f"- **compression ratio (whole file): {r['ratio']:.1f}×**",
                  f"- weights only (paper convention: compressed weights vs their float32 size): "
                  f"{r['weights_only']['ratio']:.1f}×",
                  f"- baseline accuracy {fmt(r['baseline_accuracy'])} %, **decoded-file accuracy "
                  f"{fmt(r['final_accuracy'])} %** (loss {fmt(r['accuracy_loss'])} points)",
                  f"- decoded tensors bit-exact with the evaluated weights: {r['bit_exact']}", "",
                  "| breakdown | ratio |", "|---|---|",
                  f"| pruning only (computed: float32 values + fixed-width gaps) | "
                  f"{fmt(r['breakdown']['pruning_only_estimate'], '.1f')}× |",
                  f"| pruning + quantization (fixed-width file) | "
                  f"{fmt(r['breakdown']['pruning+quantization_file'], '.1f')}× |",
                  f"| pruning + quantization + Huffman (file) | "
                  f"{fmt(r['breakdown']['pruning+quantization+huffman_file'], '.1f')}× |", ""]
    lines += ["## Stages", "", "| stage | method | accuracy % | seconds | peak RSS MB |", "|---|---|---|---|---|"]
    for s in r["stages"]:
        acc = s.get("verify", {}).get("accuracy", s.get("accuracy"))
        label = s["stage"] + (" (decoded file)" if "verify" in s else "") + (" (resumed)" if s.get("resumed") else "")
        lines.append(f"| {label} | {s.get('method', '')} | {fmt(acc)} | {s.get('seconds', 0):.1f} | "
                     f"{fmt(megabytes(s.get('peak_rss_bytes')), '.0f')} |")
    lines += ["", "## Tensors", "",
              "| tensor | shape | params | nonzero | density | bits | distinct | gap bits | "
              "bits/code | bits/gap | table B | encoded B | ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in r["tensors"]:
        lines.append(
            f"| `{t['name']}` | {'×'.join(map(str, t['shape']))} | {t['params']:,} | {t['nonzero']:,} | "
            f"{t['density']:.3f} | {t.get('bits', '–')} | {t['distinct']:,} | {t.get('gap_bits') or '–'} | "
            f"{fmt(t.get('huffman_bits_per_code'))} | {fmt(t.get('huffman_bits_per_gap'))} | "
            f"{fmt(t.get('table_bytes'), ',')} | {fmt(t.get('encoded_bytes'), ',')} | {fmt(t.get('ratio'), '.1f')} |")
    return "\n".join(lines) + "\n"


def megabytes(n: int | None) -> float | None:
    return None if n is None else n / 1e6


def sensitivity_markdown(result: dict) -> str:
    table = result["accuracy"]
    sparsities = list(next(iter(table.values())))
    lines = [f"# Pruning sensitivity (baseline {result['baseline']:.2f} %)", "",
             "Each layer pruned alone, one-shot, no retraining; test top-1 %.", "",
             "| layer | " + " | ".join(sparsities) + " |", "|---|" + "---|" * len(sparsities)]
    lines += [f"| `{name}` | " + " | ".join(f"{row[s]:.2f}" for s in sparsities) + " |" for name, row in table.items()]
    return "\n".join(lines) + "\n"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> None:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    write_atomic(path, buf.getvalue())


def sensitivity_plot(result: dict, path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in result["accuracy"].items():
        ax.plot([float(s) for s in row], list(row.values()), marker="o", label=name)
    ax.axhline(result["baseline"], color="gray", linestyle="--", linewidth=1, label="baseline")
    ax.set_xlabel("sparsity (fraction of weights removed)")
    ax.set_ylabel("test top-1 %")
    ax.set_title("Pruning sensitivity per layer")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def stages_plot(result: dict, path: Path) -> None:
    rows = [(s["stage"] + ("\n(file)" if "verify" in s else ""), s.get("verify", {}).get("accuracy", s.get("accuracy")))
            for s in result["stages"]]
    rows = [(k, v) for k, v in rows if v is not None]
    if not rows:
        return
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    ax.bar([k for k, _ in rows], [v for _, v in rows], color="#4c72b0")
    low = min(v for _, v in rows)
    ax.set_ylim(max(0, low - 5), 100)
    ax.set_ylabel("test top-1 %")
    ax.set_title("Accuracy after each stage")
    save_figure(fig, path)


def weights_plot(name: str, before: torch.Tensor, after: torch.Tensor, path: Path) -> None:
    """The paper's Fig. 3/5: distribution of a layer's kept weights before sharing, and the shared values."""
    plt = pyplot()
    b = before.detach().cpu().flatten().numpy()
    a = after.detach().cpu().flatten().numpy()
    b, a = b[b != 0], a[a != 0]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6, 5), sharex=True)
    top.hist(b, bins=200, color="#4c72b0")
    top.set_title(f"{name}: kept weights before sharing ({b.size:,})")
    values, counts = np.unique(a, return_counts=True)
    bottom.vlines(values, 0, counts, color="#dd8452")
    bottom.set_title(f"after sharing: {values.size} distinct values")
    bottom.set_xlabel("weight value")
    save_figure(fig, path)
