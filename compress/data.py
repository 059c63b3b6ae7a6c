"""Datasets that work on a machine with no internet: digits, Fashion-MNIST, ImageFolder.

``load(cfg, seed)`` returns train and test splits plus what a model needs to be
built (input shape, number of classes). ``batches`` is the one iterator every
loop uses: deterministic given ``(seed, epoch)``, with a copy-free fast path
for in-memory tensors and a rank split whose concatenation is the
single-process batch, so one process and N processes see the same global
batches (no padding, no repeated samples).
"""
from __future__ import annotations

import gzip
import math
import os
import socket
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from compress.distributed import local_world_size
from compress.errors import InputError, check


class DatasetName(str, Enum):
    DIGITS = "digits"  # scikit-learn's 1,797 real 8x8 digits: embedded, instant, for quick starts and tests
    FASHION_MNIST = "fashion_mnist"  # 60k/10k 28x28, from Debian's dataset-fashion-mnist
    IMAGEFOLDER = "imagefolder"  # any train/ + test/ (or val/) folder of class subfolders


@dataclass(frozen=True)
class DataConfig:
    """The ``[data]`` table.

    Args:
        name: which dataset.
        path: the dataset folder. For ``fashion_mnist`` it replaces the search (an explicit
            path that lacks the files is an error, not a silent fallback); required for
            ``imagefolder``: a folder with ``train/`` and ``test/`` (or ``val/``) subfolders.
        batch_size: the global training batch (split across ranks when distributed).
        eval_batch_size: batch for evaluation; only memory, not results, depends on it.
        image_size: crop size for ``imagefolder`` (224 as for ImageNet models).
    """

    name: DatasetName = DatasetName.DIGITS
    path: str | None = None
    batch_size: int = 128
    eval_batch_size: int = 1000
    image_size: int = 224

    def __post_init__(self):
        check(self.path is None or self.path.strip() != "", "path", "must be a folder, got an empty string")
        check(self.name is not DatasetName.IMAGEFOLDER or self.path is not None, "path",
              'required for name = "imagefolder": a folder with train/ and test/ (or val/) subfolders')
        check(self.batch_size > 0, "batch_size", f"must be > 0, got {self.batch_size}")
        check(self.eval_batch_size > 0, "eval_batch_size", f"must be > 0, got {self.eval_batch_size}")
        check(8 <= self.image_size <= 4096, "image_size", f"must be in [8, 4096], got {self.image_size}")


@dataclass
class Datasets:
    """Train and test splits and the shape facts a model is built from.

    Attributes:
        train: the training split (augmented for imagefolder).
        test: the test split.
        input_shape: ``(C, H, W)`` of one input.
        num_classes: number of labels.
        name: the dataset's name, for reports.
        calibration: the training split without augmentation, when it differs from
            ``train``; ``calibration_batch`` draws from it.
    """

    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]
    num_classes: int
    name: str
    calibration: Dataset | None = None


def load(cfg: DataConfig, seed: int = 0) -> Datasets:
    """Load the dataset ``cfg`` names.

    Args:
        cfg: the ``[data]`` table.
        seed: decides the digits train/test split (Fashion-MNIST and imagefolder have fixed splits).

    Raises:
        InputError: files missing, unreadable or malformed; the message names the file or
            folder and what to do.
    """
    return LOADERS[cfg.name](cfg, seed)


# ---------------------------------------------------------------------------- digits

# Mean and std of pixel/16 over all 1,797 digits: fixed constants, like Fashion-MNIST's,
# so normalisation does not change with the split seed.
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3760


def load_digits(cfg: DataConfig, seed: int) -> Datasets:
    """scikit-learn's digits: 80/20 split stratified by class, shuffled by ``seed``."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = ((bunch.images.astype(np.float32) / 16.0 - DIGITS_MEAN) / DIGITS_STD).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    return Datasets(train=TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                    test=TensorDataset(torch.from_numpy(x_test), torch.from_numpy(y_test)),
                    input_shape=(1, 8, 8), num_classes=10, name=DatasetName.DIGITS.value)


# ---------------------------------------------------------------------- fashion-mnist

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530
FASHION_MNIST_ENV = "COMPRESS_FASHION_MNIST"
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {  # split -> (images, labels), as Zalando and Debian name them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_HINT = "install it with `apt-get install dataset-fashion-mnist` or set data.path"
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def cache_dir() -> Path:
    """Where a downloaded dataset is kept (``$XDG_CACHE_HOME/compress`` or ``~/.cache/compress``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress"


def load_fashion_mnist(cfg: DataConfig, seed: int) -> Datasets:
    """Fashion-MNIST from the first place that has it (see ``find_fashion_mnist``)."""
    folder = find_fashion_mnist(cfg.path)
    splits = {}
    for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
        images = read_idx(idx_file(folder, images_name), IDX_IMAGES_MAGIC)
        labels = read_idx(idx_file(folder, labels_name), IDX_LABELS_MAGIC)
        if len(images) != len(labels):
            raise InputError(f"{idx_file(folder, labels_name)}: {len(labels)} labels for {len(images)} images "
                             f"in {idx_file(folder, images_name).name}; the files are from different sets, "
                             f"reinstall the dataset")
        if images.shape[1:] != (28, 28):
            raise InputError(f"{idx_file(folder, images_name)}: images are {images.shape[1]}x{images.shape[2]}, "
                             f"Fashion-MNIST's are 28x28")
        if labels.size and labels.max() > 9:
            raise InputError(f"{idx_file(folder, labels_name)}: label {int(labels.max())} out of range 0..9")
        x = torch.from_numpy(images).unsqueeze(1).float().div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        splits[split] = TensorDataset(x, torch.from_numpy(labels.astype(np.int64)))
    return Datasets(train=splits["train"], test=splits["test"], input_shape=(1, 28, 28), num_classes=10,
                    name=DatasetName.FASHION_MNIST.value)


def find_fashion_mnist(path: str | None) -> Path:
    """The folder holding the four idx files.

    Order: ``path`` (data.path; when given, the only place looked), then
    ``$COMPRESS_FASHION_MNIST``, then ``/usr/share/datasets/fashion-mnist``, then a
    torchvision download into the cache folder.

    Raises:
        InputError: no place has the files; one line saying where it looked and how to get them.
    """
    if path is not None:
        folder = Path(path).expanduser()
        if not has_fashion_mnist(folder):
            raise InputError(f"data.path {folder}: no Fashion-MNIST idx files (train-images-idx3-ubyte[.gz], ...) "
                             f"there; {FASHION_MNIST_HINT}")
        return folder
    looked = []
    env = os.environ.get(FASHION_MNIST_ENV)
    for folder in ([Path(env).expanduser()] if env else []) + [FASHION_MNIST_DIR]:
        if has_fashion_mnist(folder):
            return folder
        looked.append(str(folder))
    target = cache_dir() / "FashionMNIST" / "raw"
    try:
        download_fashion_mnist(cache_dir())
    except Exception as e:  # noqa: BLE001 -- any failure (offline, proxy, disk) means "not there"
        looked.append(f"download to {target} ({e.__class__.__name__})")
    else:
        if has_fashion_mnist(target):
            return target
        looked.append(f"download to {target}")
    raise InputError(f"Fashion-MNIST not found (looked in {', '.join(looked)}); {FASHION_MNIST_HINT}")


def download_fashion_mnist(root: Path) -> None:
    """torchvision's download (skipped by torchvision when the files are already there)."""
    import torchvision

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # a blackholed network should fail, not hang the run
    try:
        torchvision.datasets.FashionMNIST(str(root), train=True, download=True)
    finally:
        socket.setdefaulttimeout(previous)


def has_fashion_mnist(folder: Path) -> bool:
    """Whether ``folder`` holds any of the idx files (a partial set is reported when reading)."""
    return folder.is_dir() and any(
        (folder / name).is_file() or (folder / f"{name}.gz").is_file()
        for pair in FASHION_MNIST_FILES.values() for name in pair)


def idx_file(folder: Path, name: str) -> Path:
    """``name.gz`` if present, else ``name`` (the one named in errors when both are missing)."""
    gz = folder / f"{name}.gz"
    return gz if gz.is_file() or not (folder / name).is_file() else folder / name


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Read an idx file (optionally gzipped) of unsigned bytes, checking its header against its size.

    Args:
        path: the file.
        magic: the expected magic number (``0x803`` for images, ``0x801`` for labels).

    Returns:
        A uint8 array of the shape the header declares.

    Raises:
        InputError: missing, unreadable, bad gzip, wrong magic, or size not matching the header.
    """
    hint = "reinstall the dataset (`apt-get install --reinstall dataset-fashion-mnist`) or fix data.path"
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{path}: no such file; the folder has only part of Fashion-MNIST; {hint}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise InputError(f"{path}: cannot read ({e.__class__.__name__}: {first_line(e)}); {hint}") from None
    if len(raw) < 4:
        raise InputError(f"{path}: {len(raw)} bytes, too short for an idx header; {hint}")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise InputError(f"{path}: magic number 0x{found:08x}, expected 0x{magic:08x}; not an idx file of "
                         f"this kind; {hint}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise InputError(f"{path}: {len(raw)} bytes, too short for a {ndim}-d idx header; {hint}")
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    expected = header + math.prod(dims)  # Python ints: no overflow
    if len(raw) != expected:
        raise InputError(f"{path}: {len(raw)} bytes, the header ({' x '.join(map(str, dims))}) needs "
                         f"{expected}; the file is truncated or damaged; {hint}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


# ------------------------------------------------------------------------ imagefolder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_imagefolder(cfg: DataConfig, seed: int) -> Datasets:
    """``path/train`` and ``path/test`` (or ``path/val``) of class subfolders, ImageNet-style transforms."""
    from torchvision import datasets, transforms

    root = Path(cfg.path).expanduser()
    layout = "an imagefolder dataset needs train/ and test/ (or val/) folders of class subfolders"
    if not root.is_dir():
        raise InputError(f"data.path {root}: no such folder; {layout}")
    train_dir = root / "train"
    test_dir = next((root / d for d in ("test", "val") if (root / d).is_dir()), None)
    if not train_dir.is_dir():
        raise InputError(f"data.path {root}: no train/ subfolder; {layout}")
    if test_dir is None:
        raise InputError(f"data.path {root}: no test/ or val/ subfolder; {layout}")
    size = cfg.image_size
    normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), normalize])
    test_tf = transforms.Compose([transforms.Resize(int(size * 256 / 224)), transforms.CenterCrop(size),
                                  transforms.ToTensor(), normalize])

    def folder(path: Path, transform) -> Dataset:
        try:
            return datasets.ImageFolder(str(path), transform=transform)
        except (FileNotFoundError, OSError) as e:
            raise InputError(f"{path}: {first_line(e)}; {layout}, each holding images") from None

    train, test = folder(train_dir, train_tf), folder(test_dir, test_tf)
    if test.classes != train.classes:
        odd = sorted(set(train.classes) ^ set(test.classes))
        raise InputError(f"{test_dir}: class folders differ from {train_dir} (e.g. {odd[0]!r}); labels are "
                         f"numbered by sorted folder name, so both splits need the same class folders")
    return Datasets(train=train, test=test, input_shape=(3, size, size), num_classes=len(train.classes),
                    name=root.name or str(root), calibration=folder(train_dir, test_tf))


LOADERS: dict[DatasetName, Callable[[DataConfig, int], Datasets]] = {
    DatasetName.DIGITS: load_digits,
    DatasetName.FASHION_MNIST: load_fashion_mnist,
    DatasetName.IMAGEFOLDER: load_imagefolder,
}


# --------------------------------------------------------------------------- batches

def batch_plan(n: int, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
               world_size: int = 1, drop_last: bool = False) -> list[Tensor]:
    """The dataset indices of this rank's share of each global batch, in order.

    The global order is ``randperm(n)`` seeded by ``seed + epoch`` (or ``0..n-1``), cut
    into global batches of ``batch_size`` (the last one shorter, or dropped with
    ``drop_last``). Each global batch is split into ``world_size`` contiguous shares
    as even as possible (see ``share_bounds``), so concatenating the ranks' shares in
    rank order gives back the global batch: N processes see exactly the batches one
    process sees, reshuffled each epoch like ``DistributedSampler.set_epoch``. Nothing is
    padded or repeated. With ``world_size > 1`` a last global batch smaller than
    ``world_size`` is dropped, since some process would have nothing to train on.

    Raises:
        ValueError: ``batch_size < world_size`` or a rank outside ``[0, world_size)``.
    """
    if world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
    if batch_size < world_size:
        raise ValueError(f"batch_size must be >= world_size = {world_size} (a share for every process), "
                         f"got {batch_size}")
    if n == 0:
        return []
    if shuffle:
        generator = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=generator)
    else:
        order = torch.arange(n)
    plan = []
    for size, start in zip(global_batch_sizes(n, batch_size, world_size, drop_last),
                           range(0, n, batch_size)):
        lo, hi = share_bounds(size, rank, world_size)
        plan.append(order[start + lo: start + hi])
    return plan


def global_batch_sizes(n: int, batch_size: int, world_size: int = 1, drop_last: bool = False) -> list[int]:
    """The size of each global batch of an epoch over ``n`` samples (see ``batch_plan``)."""
    sizes = [min(batch_size, n - start) for start in range(0, n, batch_size)]
    if sizes and (drop_last and sizes[-1] < batch_size or sizes[-1] < world_size):
        sizes.pop()
    return sizes


def share_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """``[lo, hi)`` of rank ``rank``'s share of a global batch of ``size``: the first ``size % world_size``
    ranks take one sample more than the others."""
    base, extra = divmod(size, world_size)
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (rank < extra)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Rank ``rank``'s contiguous slice of ``dataset``; the slices partition it (for evaluation).

    A ``TensorDataset`` stays one (its tensors sliced, no copy), so the fast path of ``batches`` holds.
    """
    if world_size == 1:
        return dataset
    lo, hi = share_bounds(len(dataset), rank, world_size)
    if isinstance(dataset, TensorDataset):
        return TensorDataset(*(t[lo:hi] for t in dataset.tensors))
    return Subset(dataset, range(lo, hi))


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0, rank: int = 0,
            world_size: int = 1, drop_last: bool = False, num_workers: int | None = None
            ) -> Iterator[tuple[Tensor, Tensor]]:
    """Iterate over this rank's ``(inputs, labels)`` batches, deterministically given ``seed`` and ``epoch``.

    Args:
        dataset: a ``TensorDataset`` (fast path: the stored tensors are indexed directly,
            no per-sample collate) or any map-style dataset (a ``DataLoader`` over the same plan).
        batch_size: the global batch; this rank gets its share of each (see ``batch_plan``).
        shuffle: permute with a generator seeded by ``seed + epoch``; else dataset order.
        rank, world_size: this process's share; see ``batch_plan`` for the split.
        drop_last: drop a last global batch smaller than the others.
        num_workers: loader processes for the ``DataLoader`` path; ``None`` picks
            ``min(8, cpu count / processes on this machine)``. Ignored on the fast path.

    Yields:
        Tuples of tensors, the dataset's fields stacked along a first batch dimension.
    """
    plan = batch_plan(len(dataset), batch_size, shuffle=shuffle, seed=seed, epoch=epoch, rank=rank,
                      world_size=world_size, drop_last=drop_last)
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        for idx in plan:
            first, last = int(idx[0]), int(idx[-1])
            if not shuffle and last - first + 1 == len(idx):
                yield tuple(t[first: last + 1] for t in tensors)  # a contiguous run: a view, no copy
            else:
                yield tuple(t[idx] for t in tensors)
        return
    if num_workers is None:  # the machine's cores shared among the processes torchrun started on it
        num_workers = min(8, max(1, (os.cpu_count() or 1) // local_world_size()))
    # The generator seeds the workers' augmentations: per epoch, and per rank so ranks do not crop alike.
    workers_seed = (seed + epoch) * world_size + rank
    loader = DataLoader(dataset, batch_sampler=[idx.tolist() for idx in plan], num_workers=num_workers,
                        generator=torch.Generator().manual_seed(workers_seed))
    yield from loader


def calibration_batch(datasets: Datasets, n: int, seed: int) -> Tensor:
    """``n`` unlabelled training inputs drawn without replacement, deterministically from ``seed``.

    Drawn from ``datasets.calibration`` (the un-augmented train split) when set, else
    ``datasets.train``. When the split has fewer than ``n`` samples, all of them are returned.
    """
    source = datasets.calibration if datasets.calibration is not None else datasets.train
    count = min(n, len(source))
    idx = torch.randperm(len(source), generator=torch.Generator().manual_seed(seed))[:count]
    if isinstance(source, TensorDataset):
        return source.tensors[0][idx]
    return torch.stack([source[int(i)][0] for i in idx])


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__
