"""Tiny models and a stage context for stage tests (no recipe, no real dataset)."""
from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

from compress.stages.base import Context


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc1 = nn.Linear(4 * 6 * 6, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.conv(x)).flatten(1))))


def tiny_data(n: int = 192, seed: int = 0):
    """A learnable 3-class problem on 1x8x8 inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum(dim=(1, 2)) > 0).long() + (x[:, 0, 4:].sum(dim=(1, 2)) > 2).long()
    ds = TensorDataset(x, y)
    return types.SimpleNamespace(train=ds, test=ds, input_shape=(1, 8, 8), num_classes=3, name="tiny")


def tiny_context(tmp_path: Path, data=None) -> Context:
    recipe = types.SimpleNamespace(data=types.SimpleNamespace(batch_size=32, eval_batch_size=1000),
                                   model=types.SimpleNamespace(name="tiny"))
    return Context(data=data, device=torch.device("cpu"), seed=0, run_dir=Path(tmp_path),
                   log=logging.getLogger("compress.test"), recipe=recipe)
