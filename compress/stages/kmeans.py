"""K-means weight sharing with centroid fine-tuning (Deep Compression, section 3).

Per tensor, k = 2**bits centroids over the kept weights only (pruned weights
get no centroid and stay exactly zero). Fine-tuning trains the codebook: the
forward pass uses ``codebook[codes]``, so autograd's index backward sums the
gradients of each cluster's weights into its centroid, the paper's update;
codes and masks never change.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from compress import distributed
from compress import masks as masks_mod
from compress.errors import RecipeError, check
from compress.kmeans1d import Init, kmeans_1d, sse
from compress.record import Codebook, TensorRecord
from compress.stages.base import Context, Selection, State, get_param, is_conv, register
from compress.train import Optimizer, TrainConfig


@dataclass(frozen=True, eq=False)
class KMeansConfig(Selection):
    """K-means weight sharing.

    Args:
        bits: codebook of 2**bits centroids; unset = the paper's 8 for conv, 5 for fc.
        init: ``linear`` (the paper's choice), ``density`` or ``random``.
        max_iter: Lloyd iterations at most.
        finetune: centroid fine-tuning (``epochs = 0`` skips it). Adam by default: a
            centroid's gradient is a sum over its whole cluster, so its scale varies by
            orders of magnitude between layers, which Adam absorbs.
        train_other: also train the parameters that are not shared (biases, batch-norm).
    """

    bits: int | None = None
    init: Init = Init.LINEAR
    max_iter: int = 300
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(
        epochs=2, lr=1e-4, optimizer=Optimizer.ADAM, weight_decay=0.0))
    train_other: bool = True

    def __post_init__(self):
        check(self.bits is None or 1 <= self.bits <= 16, "bits", f"must be in [1, 16], got {self.bits}")
        check(1 <= self.max_iter <= 10_000, "max_iter", f"must be in [1, 10000], got {self.max_iter}")

    def bits_for(self, model: nn.Module, name: str) -> int:
        return self.bits if self.bits is not None else (8 if is_conv(model, name) else 5)


class SharedWeight(nn.Module):
    """Parametrization: the weight is ``codebook[codes]`` at kept positions, exactly zero elsewhere."""

    def __init__(self, codebook: np.ndarray, codes: torch.Tensor, mask: torch.Tensor):
        super().__init__()
        self.codebook = nn.Parameter(torch.from_numpy(codebook.copy()))
        self.register_buffer("codes", codes)
        self.register_buffer("mask", mask)

    def forward(self, _original: torch.Tensor) -> torch.Tensor:
        return torch.where(self.mask, self.codebook[self.codes], torch.zeros((), dtype=self.codebook.dtype,
                                                                             device=self.codebook.device))


def share(w: torch.Tensor, mask: torch.Tensor, bits: int, init: Init, seed: int, max_iter: int) -> TensorRecord:
    """Cluster the kept weights of one tensor into a record."""
    flat = w.detach().cpu().numpy().reshape(-1)
    positions = np.flatnonzero(mask.cpu().numpy().reshape(-1))
    centroids, codes = kmeans_1d(flat[positions], 2 ** bits, init, seed=seed, max_iter=max_iter)
    return TensorRecord(tuple(w.shape), positions, codes, Codebook(centroids))


def dense_codes(record: TensorRecord) -> torch.Tensor:
    codes = np.zeros(record.numel, dtype=np.int64)
    codes[record.positions] = record.codes
    return torch.from_numpy(codes).view(record.shape)


@register("quantize", "kmeans", KMeansConfig)
def run(model: nn.Module, state: State, cfg: KMeansConfig, ctx: Context) -> dict:
    """Share weights per tensor, fine-tune the centroids, leave records in ``state.records``."""
    chosen = cfg.select(model)
    for name, tcfg in chosen.items():
        w = get_param(model, name)
        mask = state.masks.get(name, (w != 0).cpu())
        state.masks[name] = mask
        state.records[name] = share(w, mask, tcfg.bits_for(model, name), tcfg.init, ctx.seed, tcfg.max_iter)
    # every rank clustered the same weights; rank 0's codes and codebooks make sure they agree
    state.records.update(distributed.broadcast_records({n: state.records[n] for n in chosen}))
    before = {name: sse(get_param(model, name).detach().cpu().numpy().reshape(-1)[r.positions],
                        r.table.values, r.codes) for name, r in ((n, state.records[n]) for n in chosen)}
    if cfg.finetune.epochs > 0:
        if ctx.data is None:
            raise RecipeError("finetune.epochs", "centroid fine-tuning needs a dataset; set it to 0 or add [data]")
        finetune(model, state, list(chosen), cfg, ctx)
    tensors = {}
    for name in chosen:
        record = state.records[name]
        w = get_param(model, name)
        with torch.no_grad():
            w.copy_(torch.from_numpy(record.to_dense()))
        tensors[name] = {"bits": chosen[name].bits_for(model, name), "centroids": record.table.size,
                         "sse_after_clustering": before[name]}
    return {"tensors": tensors}


def finetune(model: nn.Module, state: State, names: list[str], cfg: KMeansConfig, ctx: Context) -> None:
    """Train the codebooks (and, optionally, the unshared parameters) with codes and masks fixed."""
    shared = {n: SharedWeight(state.records[n].table.values, dense_codes(state.records[n]), state.masks[n].bool())
              for n in names}
    with masks_mod.parametrized(model, shared):
        # Forward ignores the shared tensors' original weights: freeze them, or DDP would wait for their gradients.
        ignored = {id(parametrized_original(model, n)) for n in names}
        trainable = [p for p in model.parameters() if id(p) not in ignored] if cfg.train_other \
            else [p.codebook for p in shared.values()]
        ctx.fit(model, cfg.finetune, seed=ctx.seed + 7, params=trainable, desc="centroid fine-tuning")
        for n, p in shared.items():
            old = state.records[n]
            state.records[n] = TensorRecord(old.shape, old.positions, old.codes,
                                            Codebook(p.codebook.detach().cpu().numpy()))


def parametrized_original(model: nn.Module, name: str) -> nn.Parameter:
    """The stored weight behind parametrized parameter ``name``."""
    module_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(module_name).parametrizations, attr).original
