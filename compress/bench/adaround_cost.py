"""What AdaRound's calibration costs on a large model: per layer of ResNet-18, measured, then extrapolated.

``python -m compress.bench adaround_cost`` (``--size tiny``: two layers on 32x32 inputs, seconds).
Running 10,000 iterations on each of ResNet-18's 21 layers takes far too long here, so
this times a few per layer and extrapolates, and says so. For each Conv/Linear layer of ResNet-18
(224x224 inputs, 1000 classes, random weights, BatchNorm folded as the stage does,
4-bit per-tensor grid), in the stage's network order:

- ``step``: one AdaRound iteration on a batch of 32 cached calibration inputs (the layer's
  forward pass, its weight gradient, the update of ``V``), the stage's own code
  (``adaround_layer``): after a warm-up run, the time of a run of ``1 + k`` iterations less
  that of a run of 1, divided by ``k`` (so the per-layer setup is left out);
- ``batch inputs``: computing one batch's inputs and targets (the quantized and the float
  network up to the layer, on 32 samples). When 1,024 samples' inputs and targets do not
  fit in ``cache_mb`` (512 MB, the default), the stage does this for every iteration; when
  they fit, once per 32 samples.

Extrapolated time of a layer = iterations x (step [+ batch inputs when not cached])
[+ 1024/32 x batch inputs when cached], with the paper's 10,000 iterations.
"""
from __future__ import annotations

import copy
import statistics
import time
from pathlib import Path

import torch

from compress import bench

CALIBRATION = 1024  # the paper's (and the stage's default) calibration samples
BATCH = 32
ITERATIONS = 10_000
REPEATS = 3  # the step time is the median of this many measurements
# input size, k timed iterations per measurement, layers measured (None: all 21)
SIZES = {bench.Size.TINY: (32, 1, ("conv1", "fc")), bench.Size.FULL: (224, 2, None)}


def layer_costs(image: int, steps: int, only: tuple[str, ...] | None = None, cache_mb: int = 512,
                bits: int = 4) -> list[dict]:
    """Per layer of ResNet-18: the timed step and batch-input costs, and whether the stage would cache."""
    from compress import models, quant
    from compress.fold import fold_batchnorm
    from compress.models import ModelConfig
    from compress.quant import ScaleMethod
    from compress.stages.adaround import (AdaRoundConfig, CachedData, RecomputedData, adaround_layer,
                                          execution_order, relu_follows)
    from compress.stages.base import candidate_weights

    torch.manual_seed(0)
    model = models.build(ModelConfig("torchvision:resnet18"), (3, image, image), 1000).eval()
    fold_batchnorm(model)
    fp_model = copy.deepcopy(model).requires_grad_(False)
    x = torch.randn(BATCH, 3, image, image)
    modules = [n.rpartition(".")[0] for n in candidate_weights(model)]
    order = execution_order(model, modules, x[:2])
    relu = relu_follows(model, modules, x[:2])
    rows = []
    for name in order:
        if only is not None and name not in only:
            continue
        layer = model.get_submodule(name)
        activation = torch.relu if name in relu else None
        lazy = RecomputedData(model, fp_model, name, x, activation)
        t0 = time.perf_counter()
        inputs, targets = lazy.batch(torch.arange(BATCH))
        batch_inputs = time.perf_counter() - t0
        per_sample = (inputs[0].numel() + targets[0].numel()) * 4
        g = quant.grid(layer.weight, None, bits, True, False, False, ScaleMethod.MSE)
        data = CachedData(inputs, targets)

        def timed(iterations: int) -> float:
            cfg = AdaRoundConfig(bits=bits, iterations=iterations, batch_size=BATCH)
            t0 = time.perf_counter()
            adaround_layer(layer, data, None, g.scale, g.zero_point, g.qmin, g.qmax, None, cfg, activation)
            return time.perf_counter() - t0

        timed(1)  # warm-up: allocations, kernel choice
        # the difference of two runs leaves out the per-layer setup and final rounding: iterations only
        step = statistics.median(max(timed(1 + steps) - timed(1), 0.0) / steps for _ in range(REPEATS))
        rows.append({"layer": f"{name}.weight", "weights": layer.weight.numel(), "step_s": step,
                     "batch_inputs_s": batch_inputs, "cache_mb_needed": per_sample * CALIBRATION / 2 ** 20,
                     "cached": per_sample * CALIBRATION <= cache_mb * 2 ** 20})
    return rows


def extrapolated_seconds(row: dict, iterations: int = ITERATIONS, cached: bool | None = None) -> float:
    """The stage's time on one layer with the paper's settings, from the measured costs.

    ``cached`` overrides whether the layer's calibration data are held in memory (default: as
    ``cache_mb`` decided).
    """
    if row["cached"] if cached is None else cached:
        return iterations * row["step_s"] + CALIBRATION / BATCH * row["batch_inputs_s"]
    return iterations * (row["step_s"] + row["batch_inputs_s"])


@bench.register("adaround_cost")
def adaround_cost(size: bench.Size, out: Path) -> bench.Result:
    """AdaRound on ResNet-18: measured seconds per iteration per layer, extrapolated to 10k iterations."""
    image, steps, only = SIZES[size]
    rows = layer_costs(image, steps, only)
    for row in rows:
        row["extrapolated_h"] = extrapolated_seconds(row) / 3600
    total_h = sum(r["extrapolated_h"] for r in rows)
    step_h = sum(ITERATIONS * r["step_s"] for r in rows) / 3600
    all_cached_h = sum(extrapolated_seconds(r, cached=True) for r in rows) / 3600
    cache_gb = max(r["cache_mb_needed"] for r in rows) / 1024
    table = bench.table(
        ["layer", "weights", "step s", "batch inputs s", "1024 samples MB", "cached (512 MB)", "10k iterations, h"],
        [[f"`{r['layer']}`", f"{r['weights']:,}", f"{r['step_s']:.3f}", f"{r['batch_inputs_s']:.3f}",
          f"{r['cache_mb_needed']:.0f}", "yes" if r["cached"] else "no", f"{r['extrapolated_h']:.2f}"] for r in rows])
    notes = [f"ResNet-18 at {image}x{image}, random weights, BN folded, 4-bit per-tensor grid, batch {BATCH}; "
             f"per layer, the median of {REPEATS} x (time of {1 + steps} iterations - time of 1) / {steps}, after a "
             f"warm-up run; "
             f"{torch.get_num_threads()} torch threads.",
             f"EXTRAPOLATED, not run: {ITERATIONS:,} iterations per layer (the paper's) take about {total_h:.1f} h "
             f"for the whole network on this machine with the default cache_mb = 512, of which {step_h:.1f} h are "
             f"the optimisation steps and the rest recomputing, at every step, the inputs of the layers whose "
             f"calibration data do not fit. With cache_mb = {1024 * cache_gb:.0f} (every layer cached; "
             f"{cache_gb:.1f} GB for the largest) about {all_cached_h:.1f} h.",
             "The stage runs this on every process of a torchrun job (the same result on each, rank 0's kept), "
             "so more processes do not shorten it: see compress/stages/adaround.py."]
    return bench.Result(figures={"image": image, "layers": rows, "extrapolated_total_h": total_h,
                                 "extrapolated_steps_h": step_h, "extrapolated_all_cached_h": all_cached_h,
                                 "iterations": ITERATIONS},
                        tables=[("AdaRound cost per layer of ResNet-18", table)], notes=notes)
