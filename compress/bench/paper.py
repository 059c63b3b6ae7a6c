"""The paper's Tables 2 and 3 (Deep Compression's LeNets), on Fashion-MNIST.

    python -m compress.bench paper [--size tiny|full]

For LeNet-300-100 and LeNet-5 the shipped recipe runs exactly as
``python -m compress.run RECIPE --resume`` would (``full``: in the recipe's own
folder, so an earlier run is reused and only its file re-verified). Every figure
then comes from written files:

- P+Q+H: the run's ``model.dcz`` (Huffman-coded codes and position gaps);
- P+Q: the same records read back from that file and rewritten with the
  fixed-width coder (the gap widths the recipe's encode stage would pick),
  checked to decode to the very same tensors, and evaluated.

Per compressed tensor, in the paper's layout: weights, weights kept, bits per
kept weight of the code stream and of the gap ("index") stream with and
without Huffman coding (escapes, the paper's filler zeros, included), and the
tensor's bytes in each file (its table entry, codebook and streams) ÷ its dense
float32 bytes. Then the rows the paper leaves out: the tensors stored raw
(biases) and the file's own header, table and footer, which add up with the
weights to the file's size exactly. The paper's ratios count weights only; the
whole-file ratio is the headline.
"""
from __future__ import annotations

from pathlib import Path

from torch import nn

from compress import distributed, bench, data as data_mod, modelfile, pipeline, train
from compress.bench import Result, Size, _recipes
from compress.codec import container
from compress.models import numel
from compress.stages.encode import EncodeConfig

# Han, Mao & Dally (ICLR 2016) on MNIST, Tables 2 and 3: weights kept per layer, and the model-level figures.
PAPER = {
    "lenet300": {"kept": {"fc1.weight": 8, "fc2.weight": 9, "fc3.weight": 26}, "before_kb": 1070, "after_kb": 27,
                 "ratio": 40},
    "lenet5": {"kept": {"conv1.weight": 66, "conv2.weight": 12, "fc1.weight": 8, "fc2.weight": 19},
               "before_kb": 1720, "after_kb": 44, "ratio": 39},
}


@bench.register("paper")
def paper(size: Size, out: Path) -> Result:
    """The paper's Tables 2 and 3 (per-layer P+Q and P+Q+H sizes, decoded-file accuracy) for both LeNets."""
    result = Result()
    for model in _recipes.selected(list(_recipes.LENETS)):
        recipe = _recipes.lenet_recipe(model, size)
        run = pipeline.run(recipe, out=_recipes.run_dir(recipe, size, out), resume=True)
        figures = measure(model, recipe, run.run_dir, run.report, out)
        result.figures[model] = figures
        title = f"{_recipes.NAMES[model]} ({figures['data']})"
        reused = ", ".join(figures["resumed"]) or "none"
        result.notes.append(f"- {_recipes.NAMES[model]}: run folder `{run.run_dir}`; stages reused from an earlier "
                            f"run there (resumed, then the file re-verified): {reused}.")
        result.tables += [(f"{title}: per layer (Table {2 if model == 'lenet300' else 3} layout)", layer_table(figures)),
                          (f"{title}: model", model_table([figures]))]
    result.notes += [
        "- Bits are per kept weight: the code stream's and the gap (index) stream's bits ÷ kept weights "
        "(escape symbols, the paper's filler zeros, counted in the index bits). Rate = the tensor's bytes in "
        "the file (table entry with codebook and Huffman lengths, plus its streams) ÷ its dense float32 bytes.",
        "- P+Q = pruning + k-means sharing, codes and gaps at fixed width; P+Q+H = the same records Huffman-coded "
        "(the run's model file). Both files decode to the same tensors; accuracies are of fresh models loaded "
        "from each file. The paper's ratios count weights only (its 'Total' row, our 'weights' row); the "
        "whole-file ratio includes biases and the file's own bytes.",
        "- Paper figures: Han, Mao & Dally, Deep Compression (ICLR 2016), Tables 2-3, on MNIST (not Fashion-MNIST).",
    ]
    return result


def measure(model: str, recipe, run_dir: Path, report: dict, out: Path) -> dict:
    """Per-layer and model figures of a finished run, from its file and a fixed-width rewrite of it."""
    huffman_path = run_dir / report["file"]
    fixed_path = out / f"{recipe.run.name}.fixed.dcz"
    datasets = data_mod.load(recipe.data, seed=recipe.run.seed)
    fresh = pipeline.build_model(recipe, datasets)
    rewrite_fixed(huffman_path, fixed_path, _recipes.stage(recipe, "encode").config, fresh)
    huff, fixed = container.Reader(huffman_path), container.Reader(fixed_path)
    decoded = modelfile.decode(huffman_path)
    if modelfile.differing(decoded, modelfile.decode(fixed_path), list(decoded)):
        raise RuntimeError(f"{fixed_path} does not decode to the tensors of {huffman_path}")
    modelfile.load_into(fresh, fixed_path)
    fixed_accuracy = train.evaluate(fresh, datasets, device=distributed.pick_device(recipe.run.device))
    layers = [layer(huff.info(n), fixed.info(n), PAPER[model]["kept"].get(n)) for n in huff.names
              if huff.info(n).encoding != "raw"]
    raw = [huff.info(n) for n in huff.names if huff.info(n).encoding == "raw"]
    dense = report["dense_bytes"]
    return {
        "model": model, "data": report["data"], "run_dir": str(run_dir), "file": str(huffman_path),
        "fixed_file": str(fixed_path),
        "resumed": [s["stage"] for s in report["stages"] if s.get("resumed")],
        "baseline_accuracy": report["baseline_accuracy"], "accuracy_huffman": report["final_accuracy"],
        "accuracy_fixed": fixed_accuracy, "accuracy_loss": report["accuracy_loss"],
        "dense_bytes": dense, "params": report["params"],
        "file_bytes_huffman": huff.size, "file_bytes_fixed": fixed.size,
        "ratio_huffman": dense / huff.size, "ratio_fixed": dense / fixed.size,
        "layers": layers, "weights": total(layers),
        "raw": {"params": sum(numel(i.shape) for i in raw), "bytes": sum(i.total_bytes for i in raw),
                "names": [i.name for i in raw], "dtypes": sorted({i.dtype for i in raw})},
        "overhead_bytes": {"huffman": huff.size - sum(huff.info(n).total_bytes for n in huff.names),
                           "fixed": fixed.size - sum(fixed.info(n).total_bytes for n in fixed.names)},
        "paper": {k: v for k, v in PAPER[model].items() if k != "kept"},
    }


def rewrite_fixed(source: Path, target: Path, encode: EncodeConfig, model: nn.Module) -> None:
    """Rewrite the records and raw tensors of ``source`` into ``target`` with the fixed-width coder.

    Args:
        encode: the recipe's encode stage; each tensor's gap width is the one it uses for this
            coder (``gap_bits``; ``auto``: the width that makes the fixed-width streams smallest).
        model: the file's model, built (it tells conv from fc for the paper's default widths).
    """
    reader = container.Reader(source)
    with container.Writer(target, reader.metadata) as writer:
        for name in reader.names:
            info = reader.info(name)
            if info.encoding == "raw":
                writer.add_raw(name, reader.array(name), dtype=info.dtype)
            else:
                writer.add(name, reader.record(name), gap_bits=encode.width_for(model, name), coder="none")


def layer(h: container.TensorInfo, f: container.TensorInfo, paper_kept: float | None) -> dict:
    """One row of the table: a compressed tensor's figures in the Huffman (h) and fixed-width (f) files."""
    n, kept = numel(h.shape), h.n_kept
    return {"name": h.name, "weights": n, "kept": kept, "kept_pct": 100 * kept / n,
            "code_bits_fixed": f.streams[0].nbits, "code_bits_huffman": h.streams[0].nbits,
            "gap_bits_fixed": f.streams[1].nbits, "gap_bits_huffman": h.streams[1].nbits,
            "gap_width_fixed": f.gap_bits, "gap_width_huffman": h.gap_bits, "code_width_fixed": f.code_bits,
            "bytes_fixed": f.total_bytes, "bytes_huffman": h.total_bytes, "dense_bytes": 4 * n,
            "paper_kept_pct": paper_kept}


def total(layers: list[dict]) -> dict:
    """The compressed tensors together: the paper's 'Total' row (weights only)."""
    keys = ("weights", "kept", "code_bits_fixed", "code_bits_huffman", "gap_bits_fixed", "gap_bits_huffman",
            "bytes_fixed", "bytes_huffman", "dense_bytes")
    row = {k: sum(r[k] for r in layers) for k in keys}
    row["kept_pct"] = 100 * row["kept"] / max(row["weights"], 1)
    return row


def rate(nbytes: int, dense: int) -> str:
    """The paper's "compress rate": compressed ÷ dense, as a percentage, with the ratio."""
    return f"{100 * nbytes / dense:.2f} % ({dense / nbytes:.1f}×)"


def per_kept(bits: int, kept: int) -> str:
    return f"{bits / kept:.2f}" if kept else "–"


def layer_table(fig: dict) -> str:
    header = ["layer", "weights", "kept %", "paper kept %", "weight bits P+Q", "weight bits P+Q+H",
              "index bits P+Q (width)", "index bits P+Q+H (width)", "rate P+Q", "rate P+Q+H"]
    rows = []
    for r in fig["layers"]:
        rows.append([f"`{r['name']}`", f"{r['weights']:,}", f"{r['kept_pct']:.1f}",
                     "–" if r["paper_kept_pct"] is None else r["paper_kept_pct"],
                     per_kept(r["code_bits_fixed"], r["kept"]), per_kept(r["code_bits_huffman"], r["kept"]),
                     f"{per_kept(r['gap_bits_fixed'], r['kept'])} ({r['gap_width_fixed']})",
                     f"{per_kept(r['gap_bits_huffman'], r['kept'])} ({r['gap_width_huffman']})",
                     rate(r["bytes_fixed"], r["dense_bytes"]), rate(r["bytes_huffman"], r["dense_bytes"])])
    w = fig["weights"]
    rows.append(["weights (paper's total: weights only)", f"{w['weights']:,}", f"{w['kept_pct']:.1f}", "",
                 per_kept(w["code_bits_fixed"], w["kept"]), per_kept(w["code_bits_huffman"], w["kept"]),
                 per_kept(w["gap_bits_fixed"], w["kept"]), per_kept(w["gap_bits_huffman"], w["kept"]),
                 rate(w["bytes_fixed"], w["dense_bytes"]), rate(w["bytes_huffman"], w["dense_bytes"])])
    raw = fig["raw"]
    rows.append([f"raw tensors ({', '.join(raw['dtypes'])}: biases)", f"{raw['params']:,}", "100", "", "", "", "", "",
                 f"{raw['bytes']:,} B", f"{raw['bytes']:,} B"])
    rows.append(["file header, metadata, footer", "", "", "", "", "", "", "",
                 f"{fig['overhead_bytes']['fixed']:,} B", f"{fig['overhead_bytes']['huffman']:,} B"])
    rows.append(["**whole file**", f"{fig['params']:,}", "", "", "", "", "", "",
                 f"**{rate(fig['file_bytes_fixed'], fig['dense_bytes'])}**",
                 f"**{rate(fig['file_bytes_huffman'], fig['dense_bytes'])}**"])
    return bench.table(header, rows)


def model_table(figs: list[dict]) -> str:
    header = ["model", "baseline %", "decoded P+Q+H file %", "decoded P+Q file %", "loss (points)", "dense bytes",
              "P+Q file", "P+Q+H file", "ratio (whole file)", "weights only (paper's convention)", "paper (MNIST)"]
    rows = []
    for f in figs:
        p = f["paper"]
        w = f["weights"]
        rows.append([_recipes.NAMES[f["model"]], f"{f['baseline_accuracy']:.2f}", f"{f['accuracy_huffman']:.2f}",
                     f"{f['accuracy_fixed']:.2f}", f"{f['accuracy_loss']:.2f}", f"{f['dense_bytes']:,}",
                     f"{f['file_bytes_fixed']:,} B ({f['ratio_fixed']:.1f}×)",
                     f"{f['file_bytes_huffman']:,} B", f"**{f['ratio_huffman']:.1f}×**",
                     f"{w['dense_bytes'] / w['bytes_huffman']:.1f}×",
                     f"{p['before_kb']:,} KB → {p['after_kb']} KB, {p['ratio']}×"])
    return bench.table(header, rows)


__all__ = ["paper", "measure", "rewrite_fixed", "PAPER"]
