"""BatchNorm folding: eval outputs unchanged, BN gone, deterministic for the decoder."""
import pytest
import torch
from torch import nn

from compress.fold import fold_batchnorm


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            if m.affine:
                m.weight.data.copy_(torch.randn(n, generator=g))  # negative factors too
                m.bias.data.copy_(torch.randn(n, generator=g))
    return model.eval()


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 4, 3)
        self.bn2 = nn.BatchNorm2d(4, affine=False)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        x = nn.functional.relu(self.bn2(self.conv2(x)))
        return self.fc(x.flatten(1))


class Block(nn.Module):
    """A ResNet basic block with a projection shortcut (conv + BN in a Sequential)."""

    def __init__(self, cin=4, c=8, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, c, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.downsample = nn.Sequential(nn.Conv2d(cin, c, 1, stride=stride, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.downsample(x))


class ResNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.block = Block()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.block(self.stem(x)).mean(dim=(2, 3)))


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so registration order decides."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y


def test_fold_batchnorm_preserves_conv_bn_relu_outputs():
    torch.manual_seed(0)
    model = randomize_bn(ConvBnRelu())
    x = torch.randn(4, 3, 8, 8)
    before = model(x)
    folded = fold_batchnorm(model)
    assert folded == ["bn", "bn2"]
    assert isinstance(model.bn, nn.Identity) and isinstance(model.bn2, nn.Identity)
    assert model.conv.bias is not None and model.conv2.bias is not None
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_fold_batchnorm_preserves_resnet_block_outputs():
    torch.manual_seed(1)
    model = randomize_bn(ResNetLike(), seed=1)
    x = torch.randn(3, 1, 12, 12)
    before = model(x)
    folded = fold_batchnorm(model)
    assert sorted(folded) == ["block.bn1", "block.bn2", "block.downsample.1", "stem.1"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert "block.bn1.running_mean" not in model.state_dict() and "block.conv1.bias" in model.state_dict()


def test_fold_batchnorm_is_deterministic_for_a_fresh_model_and_idempotent():
    torch.manual_seed(2)
    model = randomize_bn(ResNetLike(), seed=2)
    fold_batchnorm(model)
    fresh = ResNetLike().eval()
    assert fold_batchnorm(fresh) == fold_batchnorm(ResNetLike())
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(2, 1, 10, 10)
    assert torch.equal(fresh(x), model(x))
    assert fold_batchnorm(model) == []


def test_fold_batchnorm_keeps_pruned_weights_positive_zero():
    torch.manual_seed(3)
    model = randomize_bn(ConvBnRelu(), seed=3)
    with torch.no_grad():
        model.conv.weight[::2] = 0.0
    fold_batchnorm(model)
    zeros = model.conv.weight[::2]
    assert torch.all(zeros == 0) and not torch.any(torch.signbit(zeros))


def test_fold_batchnorm_falls_back_to_module_order_when_untraceable():
    torch.manual_seed(4)
    model = randomize_bn(Untraceable(), seed=4)
    x = torch.randn(2, 2, 6, 6)
    before = model(x)
    assert fold_batchnorm(model) == ["bn"]
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_leaves_bn_not_fed_by_a_conv():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    assert fold_batchnorm(model) == []
    assert isinstance(model[2], nn.BatchNorm2d)


def test_fold_batchnorm_on_torchvision_resnet18():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(5)
    model = randomize_bn(torchvision.models.resnet18(num_classes=4), seed=5)
    x = torch.randn(1, 3, 32, 32)
    before = model(x)
    assert len(fold_batchnorm(model)) == 20  # every BN of resnet18 follows a conv
    torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-4)
