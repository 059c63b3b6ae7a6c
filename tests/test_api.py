"""The Python API on plain nn.Modules: the README example, and whole-model bit-exact round trips."""
import numpy as np
import pytest
import torch
import torchvision

import compress
from compress.models import LeNet5


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def test_lenet5_encode_decode_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    masks = compress.prune(model, sparsity=0.9, layers={"conv1.*": {"sparsity": 0.34}})
    records = compress.share(model, masks=masks, layers={"fc1.*": {"bits": 4}})
    size = compress.encode(model, records, tmp_path / "lenet5.dcz")
    assert size == (tmp_path / "lenet5.dcz").stat().st_size
    decoded = compress.decode(tmp_path / "lenet5.dcz")
    state = model.state_dict()
    assert set(decoded) == set(state)
    for name, tensor in state.items():
        assert bits_equal(tensor, decoded[name]), name
    for name, mask in masks.items():
        assert torch.all(decoded[name][~mask] == 0)
        limit = 2 ** (8 if name.startswith("conv") else 4 if name == "fc1.weight" else 5)
        assert torch.unique(decoded[name][mask]).numel() <= limit


def test_linear_quantize_api_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    masks = compress.prune(model, sparsity=0.5)
    records = compress.quantize(model, bits=4, per_channel=True, masks=masks)
    compress.encode(model, records, tmp_path / "q.dcz", coder="none", gap_bits=5)
    decoded = compress.decode(tmp_path / "q.dcz")
    for name, tensor in model.state_dict().items():
        assert bits_equal(tensor, decoded[name]), name


def test_share_with_a_user_finetune_loop_moves_centroids_only():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    masks = compress.prune(model, sparsity=0.5)
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))

    def finetune(m, codebooks):
        opt = torch.optim.SGD(codebooks, lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            opt.step()

    import copy

    plain = copy.deepcopy(model)
    before = compress.share(plain, bits=2, masks={n: m.clone() for n, m in masks.items()})
    after = compress.share(model, bits=2, masks=masks, finetune=finetune)
    for name in after:
        assert np.array_equal(after[name].codes, before[name].codes)
        assert not np.array_equal(after[name].table.values, before[name].table.values)
        w = dict(model.named_parameters())[name]
        assert torch.equal(w.detach(), torch.from_numpy(after[name].to_dense()))


def test_readme_resnet18_example(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    masks = compress.prune(model, sparsity=0.9)
    records = compress.share(model, bits=5, masks=masks)
    size = compress.encode(model, records, tmp_path / "resnet18.dcz")
    same = compress.load(tmp_path / "resnet18.dcz", torchvision.models.resnet18(num_classes=10))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, same.state_dict()[name]), name
    dense = 4 * sum(p.numel() for p in model.parameters())
    assert dense / size > 15  # 10 % kept, 5-bit codes, Huffman-coded


def test_load_refuses_a_file_for_another_model(tmp_path):
    model = torch.nn.Linear(4, 2)
    compress.encode(model, {}, tmp_path / "lin.dcz")
    with pytest.raises(compress.FormatError, match="does not fit"):
        compress.load(tmp_path / "lin.dcz", torch.nn.Sequential(torch.nn.Linear(4, 2)))
