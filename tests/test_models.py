"""Tests of compress.models: the zoo, torchvision and factory builders, checkpoints."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from compress import models
from compress.errors import InputError, RecipeError
from compress.models import ModelConfig

REPO = Path(__file__).resolve().parents[1]


def shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- zoo

@pytest.mark.parametrize("name, input_shape", [
    ("lenet300", (1, 28, 28)), ("lenet300", (1, 8, 8)),
    ("mlp", (1, 28, 28)), ("mlp", (1, 8, 8)),
    ("lenet5", (1, 28, 28)), ("lenet5", (3, 32, 32)),
    ("resnet20", (1, 28, 28)), ("resnet20", (1, 8, 8)), ("resnet20", (3, 32, 32)),
])
def test_zoo_output_shape(name, input_shape):
    model = models.build(ModelConfig(name), input_shape, 10)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(3, *input_shape)).shape == (3, 10)


def test_zoo_num_classes_sets_the_last_layer():
    for name in ("lenet300", "lenet5", "resnet20", "mlp"):
        model = models.build(ModelConfig(name), (1, 28, 28), 7).eval()
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_lenet5_has_the_papers_parameter_shapes():
    model = models.build(ModelConfig("lenet5"), (1, 28, 28), 10)
    assert shapes(model) == {
        "conv1.weight": (20, 1, 5, 5), "conv1.bias": (20,),
        "conv2.weight": (50, 20, 5, 5), "conv2.bias": (50,),
        "fc1.weight": (500, 800), "fc1.bias": (500,),
        "fc2.weight": (10, 500), "fc2.bias": (10,),
    }
    # 431K parameters, the size Deep Compression reports for LeNet-5.
    assert sum(p.numel() for p in model.parameters()) == 431_080


def test_lenet5_has_no_relu_after_the_convs_as_in_caffe():
    model = models.LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    pool = nn.functional.max_pool2d
    expected = model.fc2(torch.relu(model.fc1(pool(model.conv2(pool(model.conv1(x), 2)), 2).flatten(1))))
    assert torch.equal(model(x), expected)


def test_lenet5_rejects_inputs_too_small():
    with pytest.raises(RecipeError, match="at least 16x16, got 8x8") as info:
        models.build(ModelConfig("lenet5"), (1, 8, 8), 10)
    assert info.value.key == "name"


def test_lenet300_has_784_300_100_10_weights():
    model = models.build(ModelConfig("lenet300"), (1, 28, 28), 10)
    weights = sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
    assert weights == 784 * 300 + 300 * 100 + 100 * 10
    assert shapes(model)["fc1.weight"] == (300, 784) and shapes(model)["fc3.weight"] == (10, 100)
    assert shapes(models.build(ModelConfig("lenet300"), (1, 8, 8), 10))["fc1.weight"] == (300, 64)


def test_mlp_hidden_sizes_name_layers_fc1_to_fcn():
    model = models.build(ModelConfig("mlp", hidden=(32, 16)), (1, 8, 8), 10)
    assert shapes(model) == {"fc1.weight": (32, 64), "fc1.bias": (32,), "fc2.weight": (16, 32),
                             "fc2.bias": (16,), "fc3.weight": (10, 16), "fc3.bias": (10,)}
    assert shapes(models.build(ModelConfig("mlp", hidden=()), (1, 8, 8), 10)) == {
        "fc1.weight": (10, 64), "fc1.bias": (10,)}


def test_resnet20_structure():
    model = models.build(ModelConfig("resnet20"), (1, 28, 28), 10)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 3 stages x 3 blocks x 2 convs = 19 conv layers (+ fc = 20), plus 2 projection shortcuts.
    assert len([c for c in convs if "downsample" not in c]) == 19
    assert [c for c in convs if "downsample" in c] == ["layer2.0.downsample.0", "layer3.0.downsample.0"]
    assert shapes(model)["layer3.2.conv2.weight"] == (64, 64, 3, 3) and shapes(model)["fc.weight"] == (10, 64)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6  # the paper's 0.27M


# -------------------------------------------------------------------- config / names

@pytest.mark.parametrize("name", ["lenet", "resnet", "vgg16", "torchvision:", "torchvision:res net", "a.b:",
                                  "os.system('x'):y", "__import__('os')", "pkg.mod:fn()"])
def test_modelconfig_unknown_or_malformed_name_is_a_recipe_error(name):
    with pytest.raises(RecipeError) as info:
        ModelConfig(name)
    assert info.value.key == "name"


def test_modelconfig_unknown_zoo_name_lists_allowed_forms():
    with pytest.raises(RecipeError) as info:
        ModelConfig("lenet")
    assert "allowed: lenet300, lenet5, resnet20, mlp, torchvision:<name>, package.module:function" in str(info.value)


def test_modelconfig_rejects_bad_hidden_and_empty_checkpoint():
    with pytest.raises(RecipeError) as info:
        ModelConfig("mlp", hidden=(64, 0))
    assert info.value.key == "hidden"
    with pytest.raises(RecipeError) as info:
        ModelConfig("mlp", checkpoint="")
    assert info.value.key == "checkpoint"


# -------------------------------------------------------------------- torchvision

def test_torchvision_resnet18_builds_with_one_channel_and_ten_classes():
    model = models.build(ModelConfig("torchvision:resnet18"), (1, 28, 28), 10).eval()
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.out_features == 10
    with torch.no_grad():
        assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_torchvision_three_channels_keep_the_original_stem():
    model = models.build(ModelConfig("torchvision:resnet18"), (3, 32, 32), 5)
    assert model.conv1.in_channels == 3 and model.fc.out_features == 5


def test_torchvision_unknown_builder_lists_some_allowed():
    with pytest.raises(RecipeError) as info:
        models.build(ModelConfig("torchvision:resnet9000"), (1, 28, 28), 10)
    assert info.value.key == "name" and "resnet18" in info.value.message


def test_torchvision_input_too_small_is_a_recipe_error():
    with pytest.raises(RecipeError, match="cannot take inputs of shape"):
        models.build(ModelConfig("torchvision:alexnet"), (1, 8, 8), 10)


# ------------------------------------------------------------------------ factories

@pytest.fixture
def repo_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO))


def test_factory_gets_shape_and_classes(repo_on_path):
    model = models.build(ModelConfig("tests.factory_example:make"), (1, 8, 8), 4)
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 4)


def test_factory_without_arguments_is_called_bare(repo_on_path):
    model = models.build(ModelConfig("tests.factory_example:make_fixed"), (1, 28, 28), 3)
    assert model[1].in_features == 64 and model[1].out_features == 10


def test_factory_with_kwargs_gets_both(repo_on_path):
    model = models.build(ModelConfig("tests.factory_example:make_kwargs"), (1, 4, 4), 6)
    assert model[1].in_features == 16 and model[1].out_features == 6


@pytest.mark.parametrize("name, expect", [
    ("tests.no_such_module:make", "cannot import"),
    ("tests.factory_example:missing", "no callable 'missing'"),
    ("tests.factory_example:NOT_CALLABLE", "no callable 'NOT_CALLABLE'"),
    ("tests.factory_example:not_a_model", "returned str"),
])
def test_factory_errors_name_the_key(repo_on_path, name, expect):
    with pytest.raises(RecipeError, match=expect) as info:
        models.build(ModelConfig(name), (1, 8, 8), 10)
    assert info.value.key == "name"


# ---------------------------------------------------------------------- checkpoints

def test_checkpoint_round_trip(tmp_path):
    source = models.build(ModelConfig("resnet20"), (1, 28, 28), 10)
    source.bn1.running_mean.normal_()
    for wrap in (lambda sd: sd, lambda sd: {"model": sd, "epoch": 3}, lambda sd: {"state_dict": sd},
                 lambda sd: {f"module.{k}": v for k, v in sd.items()}):
        path = models.save_checkpoint(wrap(source.state_dict()), tmp_path / "sub" / "ckpt.pt")
        target = models.build(ModelConfig("resnet20", checkpoint=str(path)), (1, 28, 28), 10)
        for k, v in source.state_dict().items():
            assert torch.equal(v, target.state_dict()[k]), k
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["ckpt.pt"]  # no temp files left


def test_save_checkpoint_replaces_atomically_and_cleans_up_on_failure(tmp_path):
    path = tmp_path / "ckpt.pt"
    models.save_checkpoint({"w": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        models.save_checkpoint({"w": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_checkpoint_missing_file():
    with pytest.raises(InputError, match=r"^checkpoint /nonexistent/x.pt: no such file$"):
        models.load_checkpoint(models.LeNet300(), "/nonexistent/x.pt")


class Evil:
    """Unpickling this would create a file: what a hostile checkpoint does."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": {"fc1.weight": torch.zeros(1)}, "payload": Evil(target)}, path)
    with pytest.raises(InputError) as info:
        models.load_checkpoint(models.LeNet300(), path)
    message = str(info.value)
    assert not target.exists()
    assert message.startswith(f"checkpoint {path}: not a plain tensor checkpoint") and "\n" not in message
    # The file really is hostile: a trusting loader would have created the file.
    torch.load(path, weights_only=False)["payload"].close()
    assert target.exists()


def test_checkpoint_shape_mismatch_names_key_and_both_shapes(tmp_path):
    path = models.save_checkpoint(models.LeNet300((1, 8, 8)).state_dict(), tmp_path / "small.pt")
    with pytest.raises(InputError) as info:
        models.load_checkpoint(models.LeNet300((1, 28, 28)), path)
    assert str(info.value) == (f"checkpoint {path}: key 'fc1.weight' has shape 300x64, "
                               f"the model expects 300x784")


def test_checkpoint_missing_and_unexpected_keys_are_named(tmp_path):
    state = models.LeNet300().state_dict()
    del state["fc2.bias"]
    path = models.save_checkpoint(state, tmp_path / "missing.pt")
    with pytest.raises(InputError, match="key 'fc2.bias' missing .model shape 100"):
        models.load_checkpoint(models.LeNet300(), path)
    state = models.LeNet300().state_dict()
    state["extra"] = torch.zeros(3)
    path = models.save_checkpoint(state, tmp_path / "extra.pt")
    with pytest.raises(InputError, match="unexpected key 'extra' .checkpoint shape 3"):
        models.load_checkpoint(models.LeNet300(), path)


@pytest.mark.parametrize("kind, expect", [("garbage", "cannot read, not a torch checkpoint or damaged"),
                                          ("truncated", "cannot read .RuntimeError"),
                                          ("list", "holds no state_dict")])
def test_checkpoint_damaged_or_wrong_content(tmp_path, kind, expect):
    path = tmp_path / "bad.pt"
    if kind == "garbage":
        path.write_bytes(b"not a checkpoint at all")
    elif kind == "truncated":
        models.save_checkpoint(models.LeNet300().state_dict(), path)
        path.write_bytes(path.read_bytes()[:300])
    else:
        torch.save([torch.zeros(1)], path)
    with pytest.raises(InputError, match=expect) as info:
        models.load_checkpoint(models.LeNet300(), path)
    assert "\n" not in str(info.value)
