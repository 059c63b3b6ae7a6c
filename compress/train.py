"""Train and evaluate loops.

They know nothing of masks or codebooks: stages hold those with
``torch.nn.utils.parametrize`` (the forward pass sees ``where(mask, w, 0)`` or
``codebook[codes]``), so one plain loop serves pretraining, retraining after
pruning, centroid fine-tuning and quantization-aware training alike.
"""
from __future__ import annotations

import contextlib
import enum
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from compress import data as data_mod
from compress import distributed
from compress.errors import check


class Optimizer(str, enum.Enum):
    SGD = "sgd"
    ADAM = "adam"


class Schedule(str, enum.Enum):
    COSINE = "cosine"  # smooth decay to 0: the best default for short retraining runs
    CONSTANT = "constant"


@dataclass(frozen=True)
class TrainConfig:
    """A training run.

    Args:
        epochs: passes over the training split (0 skips training).
        lr: peak learning rate.
        optimizer: ``sgd`` (with momentum) or ``adam``.
        momentum: SGD momentum.
        weight_decay: L2 penalty; pruned weights stay zero regardless (masks are re-applied in forward).
        schedule: ``cosine`` to zero over the run, or ``constant``.
        warmup_epochs: linear warm-up, helps deep nets (ResNet-20) start stable.
        label_smoothing: cross-entropy label smoothing.
    """

    epochs: int = 10
    lr: float = 0.05
    optimizer: Optimizer = Optimizer.SGD
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: Schedule = Schedule.COSINE
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.0

    def __post_init__(self):
        check(self.epochs >= 0, "epochs", f"must be >= 0, got {self.epochs}")
        check(0 < self.lr <= 10, "lr", f"must be in (0, 10], got {self.lr}")
        check(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        check(0 <= self.weight_decay < 1, "weight_decay", f"must be in [0, 1), got {self.weight_decay}")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs",
              f"must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        check(0 <= self.label_smoothing < 1, "label_smoothing", f"must be in [0, 1), got {self.label_smoothing}")


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer is Optimizer.ADAM:
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_at(cfg: TrainConfig, progress: float) -> float:
    """Learning rate at ``progress`` epochs into the run."""
    if cfg.warmup_epochs and progress < cfg.warmup_epochs:
        return cfg.lr * progress / cfg.warmup_epochs
    if cfg.schedule is Schedule.CONSTANT:
        return cfg.lr
    span = max(cfg.epochs - cfg.warmup_epochs, 1e-9)
    return 0.5 * cfg.lr * (1 + math.cos(math.pi * min(1.0, (progress - cfg.warmup_epochs) / span)))


def fit(model: nn.Module, datasets, cfg: TrainConfig, *, device: torch.device, seed: int,
        batch_size: int, params: Iterable[nn.Parameter] | None = None,
        after_step: Callable[[], None] | None = None, desc: str = "train",
        rank: int = 0, world_size: int = 1) -> list[float]:
    """Train ``model`` on ``datasets.train`` with cross-entropy, in one process or as one of ``world_size``.

    With several processes (a started process group) the model is wrapped in
    DistributedDataParallel and each rank takes its share of every global batch. Each
    rank's loss is its share's summed loss scaled by ``world_size / global batch``, so the
    averaged gradient is the mean over the global batch, exactly the gradient one process
    computes (up to float summation order), also for a short last batch.

    Args:
        params: what to optimise (default: every parameter that requires grad); the others
            are frozen while training, so no gradient is computed or all-reduced for them.
        after_step: called after every optimizer step (e.g. to re-project weights).
        batch_size: the global batch; each of ``world_size`` ranks takes its share.
        rank, world_size: this process's place (``compress.distributed.Process``).

    Returns:
        The mean training loss of each epoch (over this rank's samples).

    Raises:
        RecipeError: ``batch_size`` smaller than the number of processes.
    """
    check(batch_size >= world_size, "data.batch_size",
          f"must be at least the number of processes ({world_size}), got {batch_size}")
    model.to(device)
    trainable = [p for p in (model.parameters() if params is None else params) if p.requires_grad]
    optimizer = make_optimizer(trainable, cfg)
    loss_fn = nn.CrossEntropyLoss(reduction="sum", label_smoothing=cfg.label_smoothing)
    sizes = data_mod.global_batch_sizes(len(datasets.train), batch_size, world_size)
    steps = max(1, len(sizes))
    losses = []
    with only_trainable(model, trainable):
        net = distributed.wrap(model, device)
        for epoch in range(cfg.epochs):
            model.train()
            total, count = 0.0, 0
            bar = tqdm(data_mod.batches(datasets.train, batch_size, shuffle=True, seed=seed, epoch=epoch,
                                        rank=rank, world_size=world_size),
                       total=steps, desc=f"{desc} {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=None if rank == 0 else True)
            for i, (x, y) in enumerate(bar):
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(cfg, epoch + i / steps)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                summed = loss_fn(net(x), y)
                optimizer.zero_grad(set_to_none=True)
                (summed * (world_size / sizes[i])).backward()
                optimizer.step()
                if after_step is not None:
                    after_step()
                total += summed.item()
                count += len(y)
            losses.append(total / max(count, 1))
        del net  # a DDP wrapper's gradient hooks go with it, before the next one is built
    distributed.sync_buffers(model)  # BatchNorm statistics were updated per rank: take rank 0's
    model.eval()
    return losses


@contextlib.contextmanager
def only_trainable(model: nn.Module, trainable: list[nn.Parameter]) -> Iterator[None]:
    """Freeze every parameter of ``model`` not in ``trainable`` for the duration of a block."""
    keep = {id(p) for p in trainable}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in keep]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)


@torch.no_grad()
def evaluate(model: nn.Module, datasets, *, device: torch.device, batch_size: int = 1000,
             rank: int = 0, world_size: int = 1) -> float:
    """Top-1 accuracy (%) on the test split; with several processes each evaluates its slice and the counts are summed.

    Every rank must call it (the counts are all-reduced) and gets the same figure.
    """
    model.to(device).eval()
    correct = total = 0
    for x, y in data_mod.batches(data_mod.shard(datasets.test, rank, world_size), batch_size, shuffle=False):
        pred = model(x.to(device)).argmax(dim=1)
        correct += (pred == y.to(device)).sum().item()
        total += len(y)
    if world_size > 1:
        correct, total = distributed.all_sum([correct, total])
    return 100.0 * correct / max(total, 1)
