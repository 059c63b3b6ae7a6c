"""Tests of compress.data: datasets, the batch iterator, calibration samples."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset, TensorDataset

from compress import data
from compress.data import DataConfig, DatasetName
from compress.errors import InputError, RecipeError

FASHION_DIR = os.environ.get(data.FASHION_MNIST_ENV) or str(data.FASHION_MNIST_DIR)
HAS_FASHION = data.has_fashion_mnist(Path(FASHION_DIR))


# ---------------------------------------------------------------------------- config

@pytest.mark.parametrize("field, value", [("batch_size", 0), ("eval_batch_size", -1),
                                          ("image_size", 4)])
def test_dataconfig_rejects_out_of_range_values(field, value):
    with pytest.raises(RecipeError) as info:
        DataConfig(**{field: value})
    assert info.value.key == field


def test_dataconfig_imagefolder_requires_path():
    with pytest.raises(RecipeError) as info:
        DataConfig(name=DatasetName.IMAGEFOLDER)
    assert info.value.key == "path" and "train/" in info.value.message


# ---------------------------------------------------------------------------- digits

def test_digits_shapes_and_classes():
    ds = data.load(DataConfig(name=DatasetName.DIGITS), seed=0)
    x_train, y_train = ds.train.tensors
    x_test, y_test = ds.test.tensors
    assert (ds.input_shape, ds.num_classes, ds.name) == ((1, 8, 8), 10, "digits")
    assert x_train.shape == (1437, 1, 8, 8) and x_test.shape == (360, 1, 8, 8)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(y_test.tolist()) == set(range(10))


def test_digits_split_is_deterministic_and_depends_on_seed():
    a, b, c = (data.load(DataConfig(), seed=s) for s in (0, 0, 1))
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and torch.equal(a.test.tensors[1], b.test.tensors[1])
    assert not torch.equal(a.test.tensors[0], c.test.tensors[0])
    # Same 1,797 images overall, only split differently.
    whole = lambda d: torch.cat([d.train.tensors[0], d.test.tensors[0]]).flatten(1).sum(1).sort().values
    assert torch.allclose(whole(a), whole(c))


def test_digits_split_is_stratified():
    ds = data.load(DataConfig(), seed=3)
    train_counts = torch.bincount(ds.train.tensors[1], minlength=10).float()
    test_counts = torch.bincount(ds.test.tensors[1], minlength=10).float()
    ratio = test_counts / (train_counts + test_counts)
    assert torch.all((ratio - 0.2).abs() < 0.02)


def test_digits_normalisation_stats():
    ds = data.load(DataConfig())
    x = torch.cat([ds.train.tensors[0], ds.test.tensors[0]])
    assert abs(x.mean().item()) < 1e-3 and abs(x.std().item() - 1) < 1e-3
    # pixel/16 in [0, 1] maps to [-mean/std, (1-mean)/std].
    assert x.min().item() == pytest.approx(-data.DIGITS_MEAN / data.DIGITS_STD, abs=1e-5)
    assert x.max().item() == pytest.approx((1 - data.DIGITS_MEAN) / data.DIGITS_STD, abs=1e-5)


# --------------------------------------------------------------------------- batches

def index_dataset(n: int) -> TensorDataset:
    """x[i] = y[i] = i, so a batch shows which indices it holds."""
    return TensorDataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n))


def seen(dataset, batch_size, **kw) -> list[list[int]]:
    return [y.tolist() for _, y in data.batches(dataset, batch_size, **kw)]


@pytest.mark.parametrize("n, batch_size", [(100, 7), (64, 16), (5, 10)])
def test_batches_cover_every_index_once_per_epoch(n, batch_size):
    ds = index_dataset(n)
    for epoch in range(2):
        got = seen(ds, batch_size, shuffle=True, seed=1, epoch=epoch)
        flat = [i for b in got for i in b]
        assert sorted(flat) == list(range(n))
        assert all(len(b) == batch_size for b in got[:-1]) and 0 < len(got[-1]) <= batch_size


def test_batches_are_deterministic_given_seed_and_epoch():
    ds = index_dataset(200)
    first = seen(ds, 32, shuffle=True, seed=4, epoch=2)
    assert first == seen(ds, 32, shuffle=True, seed=4, epoch=2)
    assert first != seen(ds, 32, shuffle=True, seed=4, epoch=3)
    assert first != seen(ds, 32, shuffle=True, seed=5, epoch=2)
    assert [i for b in first for i in b] != list(range(200))


def test_batches_unshuffled_keep_dataset_order_and_label_pairing():
    ds = index_dataset(25)
    got = list(data.batches(ds, 10, shuffle=False))
    assert [y.tolist() for _, y in got] == [list(range(0, 10)), list(range(10, 20)), list(range(20, 25))]
    for x, y in data.batches(ds, 8, shuffle=True, seed=0):
        assert torch.equal(x.squeeze(1).long(), y)


@pytest.mark.parametrize("n, batch_size, world_size", [(96, 32, 4), (100, 24, 3), (10, 32, 4), (50, 7, 2), (33, 8, 4)])
def test_batches_rank_shares_partition_each_global_batch(n, batch_size, world_size):
    ds = index_dataset(n)
    ranks = [seen(ds, batch_size, shuffle=True, seed=2, epoch=1, rank=r, world_size=world_size)
             for r in range(world_size)]
    single = seen(ds, batch_size, shuffle=True, seed=2, epoch=1)
    # Every rank takes part in every step, with a share differing from the others' by at most one.
    assert len({len(r) for r in ranks}) == 1
    for k in range(len(ranks[0])):
        sizes = [len(ranks[r][k]) for r in range(world_size)]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    # Concatenating the ranks' k-th shares gives the single process's k-th batch: nothing padded or repeated.
    global_batches = [sum((ranks[r][k] for r in range(world_size)), []) for k in range(len(ranks[0]))]
    dropped = len(single[-1]) < world_size
    assert global_batches == (single[:-1] if dropped else single)
    assert [len(b) for b in global_batches] == data.global_batch_sizes(n, batch_size, world_size)


def test_batches_tail_smaller_than_world_is_dropped_only_when_distributed():
    ds = index_dataset(33)  # batches of 8: four full, then 1 sample, fewer than 4 processes
    assert data.global_batch_sizes(33, 8, 1) == [8, 8, 8, 8, 1]
    assert data.global_batch_sizes(33, 8, 4) == [8, 8, 8, 8]
    assert len(seen(ds, 8, shuffle=False, rank=3, world_size=4)) == 4


def test_share_bounds_worked_example():
    # 10 samples over 4 processes: 3, 3, 2, 2
    assert [data.share_bounds(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_shard_partitions_the_dataset_and_keeps_tensor_datasets():
    ds = index_dataset(10)
    shards = [data.shard(ds, r, 3) for r in range(3)]
    assert all(isinstance(s, TensorDataset) for s in shards)
    assert [int(y) for s in shards for _, y in s] == list(range(10))
    assert data.shard(ds, 0, 1) is ds
    wrapped = [data.shard(Wrapped(ds), r, 3) for r in range(3)]
    assert [int(y) for s in wrapped for _, y in s] == list(range(10))


def test_batches_drop_last_drops_the_short_global_batch():
    ds = index_dataset(50)
    assert [len(b) for b in seen(ds, 16, shuffle=True, drop_last=True)] == [16, 16, 16]
    per_rank = [seen(ds, 16, shuffle=True, drop_last=True, rank=r, world_size=2) for r in range(2)]
    assert [len(b) for b in per_rank[0]] == [8, 8, 8] == [len(b) for b in per_rank[1]]


def test_batches_reject_bad_rank():
    with pytest.raises(ValueError):
        list(data.batches(index_dataset(4), 2, shuffle=False, rank=2, world_size=2))
    with pytest.raises(ValueError, match="batch_size must be >= world_size"):
        list(data.batches(index_dataset(4), 2, shuffle=False, rank=0, world_size=3))


class Wrapped(Dataset):
    """A map-style dataset that is not a TensorDataset: takes the DataLoader path."""

    def __init__(self, inner: TensorDataset):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        return self.inner[i]


def test_batches_dataloader_path_matches_fast_path():
    ds = index_dataset(70)
    kw = dict(shuffle=True, seed=3, epoch=1, rank=1, world_size=3)
    fast = list(data.batches(ds, 6, **kw))
    slow = list(data.batches(Wrapped(ds), 6, num_workers=0, **kw))
    assert len(fast) == len(slow)
    for (xf, yf), (xs, ys) in zip(fast, slow):
        assert torch.equal(xf, xs) and torch.equal(yf, ys)


def test_calibration_batch_is_deterministic_unlabelled_and_from_train():
    ds = data.load(DataConfig())
    a, b, c = (data.calibration_batch(ds, 64, seed=s) for s in (7, 7, 8))
    assert a.shape == (64, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    train = ds.train.tensors[0].flatten(1)
    assert all((train == row).all(1).any() for row in a.flatten(1))
    assert len(data.calibration_batch(ds, 10_000, seed=0)) == len(ds.train)  # capped at the split


# ---------------------------------------------------------------------- fashion-mnist

def write_idx(path: Path, array: np.ndarray, magic: int, compress: bool = True) -> None:
    raw = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


def tiny_fashion(folder: Path, n_train: int = 12, n_test: int = 6) -> Path:
    """Four small, valid idx files in Fashion-MNIST's names."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = data.FASHION_MNIST_FILES[split]
        write_idx(folder / f"{images}.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), 0x803)
        write_idx(folder / f"{labels}.gz", rng.integers(0, 10, n, dtype=np.uint8), 0x801)
    return folder


@pytest.fixture(scope="module")
def fashion():
    if not HAS_FASHION:
        pytest.skip(f"Fashion-MNIST not installed at {FASHION_DIR} (apt-get install dataset-fashion-mnist, "
                    f"or set {data.FASHION_MNIST_ENV})")
    return data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=FASHION_DIR))


@pytest.mark.fashion
def test_fashion_mnist_loads_60000_10000(fashion):
    x_train, y_train = fashion.train.tensors
    x_test, y_test = fashion.test.tensors
    assert x_train.shape == (60000, 1, 28, 28) and x_test.shape == (10000, 1, 28, 28)
    assert (fashion.input_shape, fashion.num_classes) == ((1, 28, 28), 10)
    assert torch.equal(torch.bincount(y_train), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(y_test), torch.full((10,), 1000))
    assert abs(x_train.mean().item()) < 0.01 and abs(x_train.std().item() - 1) < 0.01


def test_fashion_mnist_reads_a_folder_given_as_path(tmp_path):
    folder = tiny_fashion(tmp_path / "fm")
    ds = data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=str(folder)))
    assert ds.train.tensors[0].shape == (12, 1, 28, 28) and ds.test.tensors[1].shape == (6,)
    raw = np.frombuffer(gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())[16:], np.uint8)
    expected = (torch.from_numpy(raw.astype(np.float32)) / 255 - 0.2860) / 0.3530
    assert torch.allclose(ds.train.tensors[0].flatten(), expected)


def test_fashion_mnist_reads_uncompressed_files_from_env_var(tmp_path, monkeypatch):
    folder = tiny_fashion(tmp_path / "fm")
    for gz in folder.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(folder))
    ds = data.load(DataConfig(name=DatasetName.FASHION_MNIST))
    assert len(ds.train) == 12 and len(ds.test) == 6


@pytest.mark.parametrize("damage, expect", [
    ("magic", "magic number 0x00000802"),
    ("truncate", "truncated or damaged"),
    ("gzip", "cannot read"),
])
def test_fashion_mnist_corrupted_idx_file_names_the_file(tmp_path, damage, expect):
    folder = tiny_fashion(tmp_path / "fm")
    bad = folder / "t10k-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    if damage == "magic":
        bad.write_bytes(gzip.compress(struct.pack(">I", 0x802) + raw[4:]))
    elif damage == "truncate":
        bad.write_bytes(gzip.compress(raw[:-100]))
    else:
        bad.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(InputError) as info:
        data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=str(folder)))
    message = str(info.value)
    assert str(bad) in message and expect in message and "\n" not in message


def test_fashion_mnist_label_count_mismatch_names_the_labels_file(tmp_path):
    folder = tiny_fashion(tmp_path / "fm")
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(11, np.uint8), 0x801)
    with pytest.raises(InputError, match="train-labels-idx1-ubyte.gz: 11 labels for 12 images"):
        data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=str(folder)))


def test_fashion_mnist_missing_file_in_partial_folder_is_named(tmp_path):
    folder = tiny_fashion(tmp_path / "fm")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(InputError, match="t10k-labels-idx1-ubyte.gz: no such file"):
        data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=str(folder)))


def test_fashion_mnist_explicit_path_without_files_is_an_error(tmp_path):
    with pytest.raises(InputError) as info:
        data.load(DataConfig(name=DatasetName.FASHION_MNIST, path=str(tmp_path)))
    assert str(tmp_path) in str(info.value) and "apt-get install dataset-fashion-mnist" in str(info.value)


def test_fashion_mnist_nowhere_says_where_it_looked_and_how_to_install(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(empty))
    monkeypatch.setattr(data, "FASHION_MNIST_DIR", tmp_path / "absent")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(root):
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "download_fashion_mnist", offline)
    with pytest.raises(InputError) as info:
        data.load(DataConfig(name=DatasetName.FASHION_MNIST))
    message = str(info.value)
    assert "\n" not in message
    for part in (str(empty), str(tmp_path / "absent"), "download", "OSError",
                 "install it with `apt-get install dataset-fashion-mnist` or set data.path"):
        assert part in message


# ------------------------------------------------------------------------ imagefolder

def tiny_imagefolder(root: Path, splits=("train", "test"), classes=("cat", "dog")) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def test_imagefolder_loads_and_batches(tmp_path):
    root = tiny_imagefolder(tmp_path / "imgs", splits=("train", "val"))
    ds = data.load(DataConfig(name=DatasetName.IMAGEFOLDER, path=str(root), image_size=32))
    assert (ds.input_shape, ds.num_classes, len(ds.train), len(ds.test)) == ((3, 32, 32), 2, 4, 4)
    (x, y), = list(data.batches(ds.test, 4, shuffle=False, num_workers=0))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    calib = data.calibration_batch(ds, 3, seed=0)
    assert calib.shape == (3, 3, 32, 32) and torch.equal(calib, data.calibration_batch(ds, 3, seed=0))


@pytest.mark.parametrize("layout, expect", [("no_test", "no test/ or val/"), ("empty", "train"),
                                            ("missing", "no such folder")])
def test_imagefolder_missing_or_empty_folders_are_input_errors(tmp_path, layout, expect):
    root = tmp_path / "imgs"
    if layout == "no_test":
        tiny_imagefolder(root, splits=("train",))
    elif layout == "empty":
        (root / "train").mkdir(parents=True)
        tiny_imagefolder(root, splits=("test",))
    with pytest.raises(InputError) as info:
        data.load(DataConfig(name=DatasetName.IMAGEFOLDER, path=str(root), image_size=32))
    assert expect in str(info.value) and "\n" not in str(info.value)
