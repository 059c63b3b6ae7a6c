"""Trade-off curves (the paper's Fig. 6): accuracy loss vs compression ratio, for both LeNets.

    python -m compress.bench tradeoff [--size tiny|full]

One trained baseline per model (the recipe's pretraining, cached in the recipe's
run folder and shared with ``python -m compress.run`` and the ``paper``
benchmark) and one pruning path from it: the recipe's own iterative schedule,
step ``r`` taking every layer to ``density ** (r / rounds)`` of its weights
(``density`` as the recipe sets it per layer) and retraining with the recipe's
retraining settings, continued past the recipe's target. Every point is a file,
written, measured on disk and decoded into a fresh model to be evaluated:

- pruning only: each step of the path; the kept weights as float32 values, their
  positions as Huffman-coded gaps (a ``.dcz`` holding, per pruned tensor, a
  one-value codebook tensor for the positions and a raw float32 tensor of values);
- quantization only: k-means sharing of the unpruned baseline at each bit width;
- pruning + quantization: k-means sharing of each step of the path at each bit
  width, written with fixed-width codes and gaps (P+Q) and Huffman-coded (P+Q+H).

Each sharing point fine-tunes its centroids for the same few epochs. Points,
path checkpoints and files are kept under the benchmark's folder and reused
when their inputs are unchanged, so an interrupted sweep picks up where it
stopped. From the same points: the highest ratio whose accuracy loss is at most
0.5 points, per model.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress import distributed, bench, data as data_mod, modelfile, pipeline, report, train
from compress.bench import Result, Size, _recipes
from compress.codec import container
from compress.errors import FormatError, InputError
from compress.record import Codebook, TensorRecord
from compress.stages import Context, State
from compress.stages import kmeans, prune

BUDGETS = (0.5, 1.0)  # accuracy loss, in points, for "highest ratio within"
VALUES = ".kept_values"  # suffix of the raw tensor holding a pruned tensor's kept values in a pruning-only file
PRUNING, QUANTIZATION, BOTH = "pruning only", "quantization only", "pruning + quantization"


@dataclass(frozen=True)
class Sweep:
    """What the sweep covers at one size.

    Args:
        beyond: pruning steps past the recipe's target density (the path has ``rounds + beyond`` steps).
        bits: k-means bit widths of the pruning + quantization points.
        quant_bits: k-means bit widths of the quantization-only points.
        share_epochs: centroid fine-tuning epochs of every sharing point (the recipes use 3-4).
        share_from: pruning + quantization points from path step ``ceil(share_from * rounds)`` on
            (the denser early steps only make larger files at no gain in accuracy).
        prune_epochs: retraining epochs after each pruning step; None keeps the recipe's.
    """

    beyond: int
    bits: tuple[int, ...]
    quant_bits: tuple[int, ...]
    share_epochs: int
    share_from: float = 0.0
    prune_epochs: int | None = None


SWEEPS = {
    Size.TINY: Sweep(beyond=1, bits=(2, 4), quant_bits=(2, 4), share_epochs=1, prune_epochs=1),
    Size.FULL: Sweep(beyond=2, bits=(2, 3, 4, 5), quant_bits=(2, 3, 4, 5, 6, 8), share_epochs=1, share_from=0.5),
}


@bench.register("tradeoff")
def tradeoff(size: Size, out: Path) -> Result:
    """Accuracy loss vs ratio for pruning, quantization and both (paper's Fig. 6); best ratio within 0.5 points."""
    result = Result()
    sweep = SWEEPS[size]
    for model in _recipes.selected(list(_recipes.LENETS)):
        figures = run_sweep(model, size, sweep, out / model)
        result.figures[model] = figures
        result.tables.append((f"{_recipes.NAMES[model]} ({figures['data']}): every point", points_table(figures)))
    result.tables.insert(0, ("Highest ratio within an accuracy budget", best_table(result.figures)))
    plot(result.figures, out / "tradeoff.png")
    result.files.append("tradeoff.png")
    result.notes += [
        "- Ratio = dense float32 bytes of all parameters ÷ the point's file on disk (biases, tables, headers "
        "included); accuracy = test top-1 of a fresh model loaded from that file; loss = baseline − accuracy.",
        "- Pruning only stores the kept weights as float32 values and their positions as Huffman-coded gaps; "
        "the format's one-value code stream adds 1 bit per kept weight. Quantization only stores every weight's "
        "code, and the format still stores positions: 1 bit per weight of (all-zero) gaps.",
        "- 'path step r/R': the recipe's iterative pruning schedule (R rounds to its per-layer densities), "
        "continued past it; 'prune epochs' counts all retraining epochs on the way to that step, 'fine-tune "
        "epochs' the centroid fine-tuning of that point. P+Q (fixed width) and P+Q+H are the same records, "
        "so they decode to the same tensors (checked) and share an accuracy.",
    ]
    return result


# --- the sweep ---------------------------------------------------------------------------------------


def run_sweep(model_name: str, size: Size, sweep: Sweep, out: Path) -> dict:
    """Baseline, pruning path and every point of one model; returns its figures."""
    recipe = _recipes.lenet_recipe(model_name, size)
    (out / "files").mkdir(parents=True, exist_ok=True)
    (out / "path").mkdir(exist_ok=True)
    log = pipeline.setup_logging(out)
    datasets = data_mod.load(recipe.data, seed=recipe.run.seed)
    model = pipeline.build_model(recipe, datasets)
    run_dir = _recipes.run_dir(recipe, size, out.parent)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = Context(data=datasets, device=distributed.pick_device(recipe.run.device), seed=recipe.run.seed,
                  run_dir=run_dir, log=log, pretrain=recipe.pretrain, recipe=recipe)
    baseline = pipeline.pretrain(model, recipe, ctx)
    ctx.run_dir = out  # nothing of the sweep goes into the recipe's run folder
    sweeper = Sweeper(recipe, sweep, model, datasets, ctx, out, baseline)
    started = time.perf_counter()
    points = sweeper.run()
    return {
        "model": model_name, "data": datasets.name, "recipe": str(recipe.path), "baseline_accuracy": baseline["accuracy"],
        "baseline_cached": bool(baseline.get("resumed")), "dense_bytes": sweeper.dense_bytes,
        "sweep": dataclasses.asdict(sweep), "rounds": sweeper.rounds, "points": points,
        "best": {str(b): best_within(points, b) for b in BUDGETS}, "seconds": time.perf_counter() - started,
    }


class Sweeper:
    """The points of one model, each reused from the cache when its inputs are unchanged."""

    def __init__(self, recipe, sweep: Sweep, model: nn.Module, datasets, ctx: Context, out: Path, baseline: dict):
        self.recipe, self.sweep, self.model, self.datasets, self.ctx, self.out = recipe, sweep, model, datasets, ctx, out
        self.baseline = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.baseline_accuracy = baseline["accuracy"]
        self.fingerprint = baseline["fingerprint"]
        self.dense_bytes = 4 * sum(p.numel() for p in model.parameters())
        self.prune_cfg = _recipes.stage(recipe, "prune", "magnitude").config
        self.kmeans_cfg = _recipes.stage(recipe, "quantize", "kmeans").config
        self.encode_cfg = _recipes.stage(recipe, "encode").config
        self.rounds = self.prune_cfg.rounds
        self.densities = target_densities(self.prune_cfg, model)
        self.cache = Cache(out / "points.json")

    def run(self) -> list[dict]:
        points = [self.shared(self.baseline, all_kept(self.model, self.kmeans_cfg), bits, QUANTIZATION,
                              {"step": 0, "prune_epochs": 0}, self.fingerprint)
                  for bits in self.sweep.quant_bits]
        points = [p for pair in points for p in pair]
        state, masks, fingerprint, epochs = self.baseline, {}, self.fingerprint, 0
        for step in range(1, self.rounds + self.sweep.beyond + 1):
            state, masks, fingerprint, epochs = self.prune_step(step, state, masks, fingerprint, epochs)
            where = {"step": step, "prune_epochs": epochs}
            points.append(self.pruned(state, masks, where, fingerprint))
            if step >= math.ceil(self.sweep.share_from * self.rounds):
                for bits in self.sweep.bits:
                    points += self.shared(state, masks, bits, BOTH, where, fingerprint)
        return points

    # --- the pruning path

    def prune_step(self, step: int, state: dict, masks: dict, fingerprint: str, epochs: int):
        """Prune the path's step ``step`` from the previous one (or reload it); returns its state."""
        t = step / self.rounds
        retrain = self.prune_cfg.retrain
        if self.sweep.prune_epochs is not None:
            retrain = dataclasses.replace(retrain, epochs=self.sweep.prune_epochs)
        targets = {name: 1.0 - d ** t for name, d in self.densities.items()}
        cfg = dataclasses.replace(self.prune_cfg, rounds=1, retrain=retrain,
                                  layers={name: {"sparsity": s} for name, s in targets.items()})
        fingerprint = pipeline.digest(fingerprint, "prune", step, self.rounds, targets, self.recipe.source["stages"]
                                      ["prune"].get("retrain"), retrain.epochs, self.recipe.data.batch_size)
        path = self.out / "path" / f"{step:02d}.pt"
        self.model.load_state_dict(state)
        loaded = State(masks=dict(masks))
        if pipeline.load_stage(path, fingerprint, self.model, loaded) is None:
            self.ctx.log.info("tradeoff: pruning step %d (t = %.2f)", step, t)
            self.ctx.seed = self.recipe.run.seed + 1000 * (step - 1)  # the recipe's round seeds: seed + 1000 r
            prune.run(self.model, loaded, cfg, self.ctx)
            self.ctx.seed = self.recipe.run.seed
            pipeline.save_stage(path, fingerprint, self.model, loaded, {"stage": "prune", "step": step})
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return state, dict(loaded.masks), fingerprint, epochs + retrain.epochs

    # --- the points

    def pruned(self, state: dict, masks: dict, where: dict, fingerprint: str) -> dict:
        """The pruning-only point of a path step: float32 values + Huffman-coded gaps."""
        key = f"p{where['step']:02d}"
        path = self.out / "files" / f"{key}.dcz"
        cached = self.cache.get(key, fingerprint, [path])
        if cached:
            return cached
        size = write_pruned(path, state, masks)
        decoded = read_pruned(path)
        if modelfile.differing(state, decoded, list(state)):
            raise RuntimeError(f"{path} does not decode to the pruned weights")
        fresh = pipeline.build_model(self.recipe, self.datasets)
        fresh.load_state_dict(decoded)
        point = self.point(PRUNING, "float32 + Huffman gaps", where, masks, None, 0, path, size, self.evaluate(fresh))
        return self.cache.put(key, fingerprint, point)

    def shared(self, state: dict, masks: dict, bits: int, family: str, where: dict, fingerprint: str) -> list[dict]:
        """A k-means point (from ``state`` with ``masks`` held): its fixed-width and its Huffman file."""
        key = f"{'q' if family == QUANTIZATION else 'pq'}{where['step']:02d}b{bits}"
        paths = {coder: self.out / "files" / f"{key}.{coder}.dcz" for coder in ("none", "huffman")}
        epochs = self.sweep.share_epochs
        cfg = dataclasses.replace(self.kmeans_cfg, bits=bits, layers={},
                                  finetune=dataclasses.replace(self.kmeans_cfg.finetune, epochs=epochs))
        fingerprint = pipeline.digest(fingerprint, "kmeans", bits, epochs, self.recipe.source["stages"]["quantize"],
                                      self.recipe.source["stages"]["encode"], self.recipe.data.batch_size)
        cached = [self.cache.get(f"{key}.{c}", fingerprint, [p]) for c, p in paths.items()]
        if all(cached):
            return cached
        self.ctx.log.info("tradeoff: %s, step %d, %d bits", family, where["step"], bits)
        self.model.load_state_dict(state)
        run = State(masks={n: m.clone() for n, m in masks.items()})
        kmeans.run(self.model, run, cfg, self.ctx)
        widths = {n: self.encode_cfg.width_for(self.model, n) for n in run.records}
        sizes = {c: modelfile.save(p, self.model.state_dict(), run.records, coder=c, gap_bits=widths)[1]
                 for c, p in paths.items()}
        decoded = {c: modelfile.decode(p) for c, p in paths.items()}
        if modelfile.differing(decoded["huffman"], decoded["none"], list(decoded["huffman"])) or \
                modelfile.differing(self.model.state_dict(), decoded["huffman"], list(run.records)):
            raise RuntimeError(f"{key}: the files do not decode to the shared weights")
        fresh = pipeline.build_model(self.recipe, self.datasets)
        accuracy = self.evaluate(modelfile.load_into(fresh, paths["huffman"]))
        label = {"none": "fixed width", "huffman": "Huffman"}
        return [self.cache.put(f"{key}.{c}", fingerprint,
                               self.point(family, label[c], where, run.masks, bits, epochs, paths[c], sizes[c], accuracy))
                for c in paths]

    def point(self, family: str, coder: str, where: dict, masks: dict, bits: int | None, share_epochs: int,
              path: Path, size: int, accuracy: float) -> dict:
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        return {"family": family, "coder": coder, "step": where["step"], "rounds": self.rounds,
                "kept_pct": 100 * kept / total, "bits": bits, "prune_epochs": where["prune_epochs"],
                "share_epochs": share_epochs, "file": str(path.relative_to(self.out)), "file_bytes": size,
                "ratio": self.dense_bytes / size, "accuracy": accuracy, "loss": self.baseline_accuracy - accuracy}

    def evaluate(self, model: nn.Module) -> float:
        return train.evaluate(model, self.datasets, device=self.ctx.device)


def target_densities(cfg: prune.PruneConfig, model: nn.Module) -> dict[str, float]:
    """The fraction of weights the recipe keeps in each pruned tensor.

    Raises:
        InputError: the recipe prunes by quality or with one global threshold (the path needs
            a density per tensor).
    """
    if cfg.scope is not prune.Scope.TENSOR or cfg.quality is not None:
        raise InputError("the trade-off sweep needs [stages.prune] with per-tensor sparsities "
                         "(scope = \"tensor\", no quality)")
    return {name: 1.0 - c.sparsity for name, c in cfg.select(model).items()}


def all_kept(model: nn.Module, cfg: kmeans.KMeansConfig) -> dict[str, torch.Tensor]:
    """Masks that keep every weight of the tensors ``cfg`` shares (quantization without pruning)."""
    params = dict(model.named_parameters())
    return {name: torch.ones_like(params[name], dtype=torch.bool, device="cpu") for name in cfg.select(model)}


# --- pruning-only files --------------------------------------------------------------------------------


def write_pruned(path: Path, state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> int:
    """Write a pruned model as it would be stored without quantization: float32 kept values + gaps.

    Each pruned tensor becomes two: under its own name a sparse tensor whose codebook is
    the single value 1.0 (its streams: Huffman-coded position gaps, and one code per
    kept weight), and under ``name + ".kept_values"`` its kept values, raw float32 in
    position order. Every other tensor is stored raw float32.

    Returns:
        The file's size in bytes.
    """
    with container.Writer(path, metadata={"content": "pruned, float32 values"}) as writer:
        for name, tensor in state_dict.items():
            values = tensor.detach().cpu().float().numpy()
            if name in masks:
                positions = np.flatnonzero(masks[name].cpu().numpy().reshape(-1))
                record = TensorRecord(values.shape, positions, np.zeros(positions.size, np.int64),
                                      Codebook(np.ones(1, np.float32)))
                writer.add(name, record, coder="huffman")
                writer.add_raw(name + VALUES, values.reshape(-1)[positions])
            else:
                writer.add_raw(name, values)
    return writer.size


def read_pruned(path: Path) -> dict[str, torch.Tensor]:
    """Decode a file written by ``write_pruned`` into a state_dict.

    Raises:
        FormatError: the file is damaged, or a values tensor does not fit its positions.
    """
    reader = container.Reader(path)
    out = {}
    for name in reader.names:
        if name.endswith(VALUES):
            continue
        if name + VALUES not in reader.names:
            out[name] = torch.from_numpy(reader.array(name).copy())
            continue
        record, values = reader.record(name), reader.array(name + VALUES)
        if values.shape != record.positions.shape:
            raise FormatError(f"tensor {name + VALUES!r}", None,
                              f"{values.size} values for {record.positions.size} kept positions")
        dense = np.zeros(record.numel, dtype=np.float32)
        dense[record.positions] = values
        out[name] = torch.from_numpy(dense.reshape(record.shape))
    return out


# --- choosing, caching, showing --------------------------------------------------------------------------


def best_within(points: list[dict], budget: float) -> dict | None:
    """The point of highest ratio whose accuracy loss is at most ``budget`` points (None if none is)."""
    fit = [p for p in points if p["loss"] <= budget]
    return max(fit, key=lambda p: p["ratio"]) if fit else None


def frontier(points: list[dict]) -> list[dict]:
    """The points no other point beats on both ratio and loss, by increasing ratio."""
    best: list[dict] = []
    for p in sorted(points, key=lambda p: (-p["ratio"], p["loss"])):
        if not best or p["loss"] < best[-1]["loss"]:
            best.append(p)
    return best[::-1]


class Cache:
    """Finished points by key, valid while their fingerprint matches and their file is unchanged on disk."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.entries = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            self.entries = {}  # a damaged cache is simply redone

    def get(self, key: str, fingerprint: str, files: list[Path]) -> dict | None:
        entry = self.entries.get(key)
        if not entry or entry.get("fingerprint") != fingerprint:
            return None
        point = entry["point"]
        if not all(f.exists() for f in files) or point["file_bytes"] != files[0].stat().st_size:
            return None
        return point

    def put(self, key: str, fingerprint: str, point: dict) -> dict:
        self.entries[key] = {"fingerprint": fingerprint, "point": point}
        report.write_atomic(self.path, json.dumps(self.entries, indent=1))
        return point


def describe(p: dict) -> str:
    parts = []
    if p["step"]:
        parts.append(f"path step {p['step']}/{p['rounds']} ({p['kept_pct']:.1f} % kept)")
    if p["bits"]:
        parts.append(f"{p['bits']}-bit k-means")
    return f"{p['family']}: " + ", ".join(parts) + f", {p['coder']}"


def best_table(figures: dict) -> str:
    header = ["model", "baseline %", *[f"highest ratio, loss ≤ {b} point" for b in BUDGETS]]
    rows = []
    for f in figures.values():
        cells = []
        for b in BUDGETS:
            p = f["best"][str(b)]
            cells.append("none" if p is None else
                         f"**{p['ratio']:.1f}×** (loss {p['loss']:.2f}; {describe(p)}; {p['file_bytes']:,} B)")
        rows.append([_recipes.NAMES[f["model"]], f"{f['baseline_accuracy']:.2f}", *cells])
    return bench.table(header, rows)


def points_table(f: dict) -> str:
    header = ["family", "coder", "path step", "kept %", "bits", "prune epochs", "fine-tune epochs", "file bytes",
              "ratio", "accuracy %", "loss"]
    family = {QUANTIZATION: 0, PRUNING: 1, BOTH: 2}
    coder = {"fixed width": 0, "Huffman": 1}
    rows = [[p["family"], p["coder"], f"{p['step']}/{p['rounds']}" if p["step"] else "–", f"{p['kept_pct']:.1f}",
             p["bits"] or "32 (float)", p["prune_epochs"], p["share_epochs"], f"{p['file_bytes']:,}",
             f"{p['ratio']:.1f}×", f"{p['accuracy']:.2f}", f"{p['loss']:.2f}"]
            for p in sorted(f["points"], key=lambda p: (family[p["family"]], coder.get(p["coder"], 0), p["step"],
                                                        -(p["bits"] or 0)))]
    return bench.table(header, rows)


SERIES = [(PRUNING, "float32 + Huffman gaps", "pruning only", "#4c72b0", "o"),
          (QUANTIZATION, "fixed width", "quantization only", "#dd8452", "s"),
          (QUANTIZATION, "Huffman", "quantization only + Huffman", "#c44e52", "s"),
          (BOTH, "fixed width", "pruning + quantization", "#55a868", "^"),
          (BOTH, "Huffman", "pruning + quantization + Huffman", "#8172b2", "^")]


def plot(figures: dict, path: Path) -> None:
    """One panel per model: every point faint, each family's frontier as a line, the 0.5-point budget."""
    plt = report.pyplot()
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(figures), figsize=(6 * len(figures), 4.5), squeeze=False)
    for ax, f in zip(axes[0], figures.values()):
        for family, coder, label, color, marker in SERIES:
            pts = [p for p in f["points"] if p["family"] == family and p["coder"] == coder]
            if not pts:
                continue
            ax.scatter([p["ratio"] for p in pts], [p["loss"] for p in pts], color=color, marker=marker, alpha=0.3, s=18)
            line = frontier(pts)
            ax.plot([p["ratio"] for p in line], [p["loss"] for p in line], color=color, marker=marker, label=label)
        best = f["best"]["0.5"]
        if best:
            ax.scatter([best["ratio"]], [best["loss"]], marker="*", s=220, color="black", zorder=5,
                       label=f"best within 0.5: {best['ratio']:.1f}×")
        ax.axhline(0.5, color="gray", linestyle="--", linewidth=1)
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(ticker.FixedLocator([1, 2, 5, 10, 20, 50, 100, 200]))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
        ax.xaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("compression ratio (dense float32 bytes ÷ file bytes)")
        ax.set_ylabel("accuracy loss (points)")
        losses = [p["loss"] for p in f["points"]]
        ax.set_ylim(min(-0.5, min(losses) - 0.2), max(2.0, min(max(losses) + 0.3, 5.0)))  # 5+ points: table only
        ax.set_title(f"{_recipes.NAMES[f['model']]} ({f['data']}), baseline {f['baseline_accuracy']:.2f} %")
        ax.legend(fontsize=7)
    report.save_figure(fig, path)


__all__ = ["tradeoff", "write_pruned", "read_pruned", "best_within", "frontier", "Sweep", "SWEEPS"]
