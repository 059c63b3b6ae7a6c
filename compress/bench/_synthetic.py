"""Synthetic models with trained-like statistics, generated deterministically from a seed.

No pretrained weights can be downloaded here, and training a ResNet-18 on the CPU is
out of reach, so the codec's large-model figures use a stand-in: the tensor shapes
of torchvision's ResNet-18 (11.7 M parameters), weights drawn from a Laplace
distribution (what trained convolution and fully connected weights look like) with
He-like scale per tensor, magnitude-pruned per tensor and shared by k-means. The
codec sees the same kind of streams a real pruned, shared model gives: uniform-ish
positions (geometric gaps) and bell-shaped codes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compress.kmeans1d import Init, kmeans_1d
from compress.record import Codebook, TensorRecord


@dataclass
class Model:
    """A synthetic model in the three forms the benchmarks compare.

    Attributes:
        name: what it stands for, as printed in tables.
        dense: the unpruned float32 state (name -> array; raw tensors included).
        pruned: ``dense`` with the pruned weights set to 0.
        records: name -> record (positions, codes, codebook) of every pruned, shared tensor.
        shared: ``pruned`` with each kept weight replaced by its centroid (the decoded model).
    """

    name: str
    dense: dict[str, np.ndarray]
    pruned: dict[str, np.ndarray]
    records: dict[str, TensorRecord]
    shared: dict[str, np.ndarray]


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry of torchvision's ResNet-18 state_dict (built on the meta device)."""
    import torch
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.resnet18(weights=None)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def lenet300_shapes() -> dict[str, tuple[int, ...]]:
    """LeNet-300-100 (784-300-100-10)."""
    return {"fc1.weight": (300, 784), "fc1.bias": (300,), "fc2.weight": (100, 300), "fc2.bias": (100,),
            "fc3.weight": (10, 100), "fc3.bias": (10,)}


def trained_like(shape: tuple[int, ...], name: str, rng: np.random.Generator) -> np.ndarray:
    """Values of one tensor: Laplace weights with He scale; batch-norm and bias entries near their usual values."""
    if len(shape) >= 2:  # conv / fc weight: std sqrt(2 / fan_in); a Laplace of scale b has std b*sqrt(2)
        fan_in = math.prod(shape[1:])
        return rng.laplace(0.0, math.sqrt(2.0 / fan_in) / math.sqrt(2.0), size=shape).astype(np.float32)
    if name.endswith("num_batches_tracked"):
        return np.zeros(shape, dtype=np.int64)
    if name.endswith("running_var"):
        return np.exp(0.3 * rng.standard_normal(shape)).astype(np.float32)
    if name.endswith(".weight"):  # batch-norm scale
        return (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
    return (0.05 * rng.standard_normal(shape)).astype(np.float32)  # biases, batch-norm shift and mean


def prune_share(w: np.ndarray, density: float, bits: int) -> TensorRecord:
    """Keep the ``density`` largest-magnitude weights of ``w`` and share them by k-means (linear init)."""
    flat = w.reshape(-1)
    keep = max(1, round(density * flat.size))
    positions = np.sort(np.argpartition(np.abs(flat), flat.size - keep)[flat.size - keep:])
    centroids, codes = kmeans_1d(flat[positions], 2 ** bits, Init.LINEAR)
    return TensorRecord(w.shape, positions, codes, Codebook(centroids))


def model(shapes: dict[str, tuple[int, ...]], name: str, *, seed: int = 0, density: float = 0.1,
          bits: int = 5) -> Model:
    """A synthetic model: every tensor of two or more dimensions pruned to ``density`` and shared at ``bits``.

    Args:
        shapes: name -> shape of every entry (the state_dict's order).
        name: label for tables.
        seed: the only source of randomness.
        density: fraction of each weight tensor kept.
        bits: codebook of ``2**bits`` shared values per weight tensor.
    """
    rng = np.random.default_rng(seed)
    dense, pruned, shared, records = {}, {}, {}, {}
    for key, shape in shapes.items():
        dense[key] = trained_like(shape, key, rng)
        if len(shape) >= 2:
            record = prune_share(dense[key], density, bits)
            records[key] = record
            kept = np.zeros(record.numel, dtype=np.float32)
            kept[record.positions] = dense[key].reshape(-1)[record.positions]
            pruned[key] = kept.reshape(shape)
            shared[key] = record.to_dense()
        else:
            pruned[key] = shared[key] = dense[key]
    return Model(name, dense, pruned, records, shared)


def resnet18(seed: int = 0) -> Model:
    """The issue's stand-in: ResNet-18-sized (11.7 M weights), 90 % pruned, 5-bit sharing."""
    return model(resnet18_shapes(), "synthetic ResNet-18 (90 % pruned, 5-bit)", seed=seed, density=0.1, bits=5)


def tensor(numel: int, *, seed: int = 0, density: float = 0.1, bits: int = 5) -> tuple[np.ndarray, TensorRecord]:
    """One flat trained-like weight tensor of ``numel`` weights and its pruned, shared record."""
    w = trained_like((1, numel), "w", np.random.default_rng(seed)).reshape(-1)
    return w, prune_share(w, density, bits)
