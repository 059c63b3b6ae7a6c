"""Models: the zoo, torchvision builders, user factories, and checkpoints.

A model is named in the recipe's ``[model]`` table in one of three forms:

- a zoo name: ``lenet300``, ``lenet5``, ``resnet20``, ``mlp``;
- ``torchvision:<builder>``, e.g. ``torchvision:resnet18`` (random weights: nothing
  is downloaded);
- ``package.module:function``, a factory that returns an ``nn.Module``.

Names are resolved with ``importlib`` and ``getattr``; nothing from a recipe is
ever passed to ``eval``/``exec``. Checkpoints are read with
``torch.load(weights_only=True)``, which refuses pickled code.
"""
from __future__ import annotations

import importlib
import inspect
import os
import pickle
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from compress import failpoints, rundir
from compress.errors import InputError, OutputError, RecipeError, check


# ------------------------------------------------------------------------------- zoo

class MLP(nn.Module):
    """flatten -> [Linear, ReLU] per hidden size -> Linear to classes; layers ``fc1``, ``fc2``, ...

    Args:
        input_shape: ``(C, H, W)``; the first layer takes ``C*H*W`` inputs.
        num_classes: outputs.
        hidden: hidden layer widths, in order (empty: a linear classifier).
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
                 hidden: tuple[int, ...] = (64,)):
        super().__init__()
        widths = [numel(input_shape), *hidden, num_classes]
        self.depth = len(widths) - 1
        for i in range(self.depth):
            setattr(self, f"fc{i + 1}", nn.Linear(widths[i], widths[i + 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        for i in range(1, self.depth):
            x = torch.relu(getattr(self, f"fc{i}")(x))
        return getattr(self, f"fc{self.depth}")(x)


class LeNet300(MLP):
    """LeNet-300-100 (LeCun et al. 1998; Deep Compression's first model): in -> 300 -> 100 -> classes.

    Layers ``fc1``, ``fc2``, ``fc3``; 784*300 + 300*100 + 100*10 weights on 28x28 inputs.
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10):
        super().__init__(input_shape, num_classes, hidden=(300, 100))


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's ``lenet_train_test.prototxt``, the variant Deep Compression prunes.

    conv1 5x5x20 -> maxpool 2 -> conv2 5x5x50 -> maxpool 2 -> fc1 500 -> ReLU -> fc2.
    No padding and no activation after the convolutions (Caffe's LeNet has none);
    fc1's inputs follow from the input size (800 for 28x28).

    Raises:
        RecipeError: inputs smaller than 16x16 leave nothing for conv2 and the second pool.
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        channels, height, width = input_shape
        h, w = ((height - 4) // 2 - 4) // 2, ((width - 4) // 2 - 4) // 2
        if h < 1 or w < 1:
            raise RecipeError("name", f"lenet5 needs inputs of at least 16x16, got {height}x{width}; "
                                      f"use lenet300 or mlp for smaller images")
        self.conv1 = nn.Conv2d(channels, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(self.conv1(x), 2)
        x = nn.functional.max_pool2d(self.conv2(x), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN pairs with a residual connection (He et al. 2016, fig. 2)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.downsample = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet20(nn.Module):
    """CIFAR-style ResNet-20 (He et al. 2016, sec. 4.2) for small inputs such as C x 28 x 28.

    3x3 conv 16 -> three stages of 3 BasicBlocks (16, 32, 64 channels; strides 1, 2, 2)
    -> global average pool -> fc. On 28x28 the stages see 28, 14 and 7 pixels; the
    global pool makes any input of at least 4x4 work.

    Shortcuts that change shape are a 1x1 conv + BN (the paper's option B) rather than
    option A (strided identity padded with zero channels): they are ordinary ``Conv2d``
    weights that pruning, weight sharing and BN folding treat like every other layer, they
    appear in the state_dict and are stored in the model file, and they cost two convs
    (16*32 + 32*64 = 2,560 weights, about 1% of the model's 0.27M).
    """

    def __init__(self, input_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(input_shape[0], 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        blocks, in_channels = [], 16
        for channels, stride in ((16, 1), (32, 2), (64, 2)):
            stage = [BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1),
                     BasicBlock(channels, channels, 1)]
            blocks.append(nn.Sequential(*stage))
            in_channels = channels
        self.layer1, self.layer2, self.layer3 = blocks
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean(dim=(2, 3)))


ZOO: dict[str, Callable[[tuple[int, ...], int, "ModelConfig"], nn.Module]] = {
    "lenet300": lambda shape, classes, cfg: LeNet300(shape, classes),
    "lenet5": lambda shape, classes, cfg: LeNet5(shape, classes),
    "resnet20": lambda shape, classes, cfg: ResNet20(shape, classes),
    "mlp": lambda shape, classes, cfg: MLP(shape, classes, cfg.hidden),
}
TORCHVISION_PREFIX = "torchvision:"
ALLOWED_FORMS = f"{', '.join(ZOO)}, torchvision:<name>, package.module:function"
FACTORY_RE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*")


# ---------------------------------------------------------------------------- config

@dataclass(frozen=True)
class ModelConfig:
    """The ``[model]`` table.

    Args:
        name: a zoo name (``lenet300``, ``lenet5``, ``resnet20``, ``mlp``),
            ``torchvision:<builder>`` (e.g. ``torchvision:resnet18``), or a factory
            ``package.module:function`` returning an ``nn.Module``.
        checkpoint: a weights file (``~`` expanded; a state_dict, or a dict holding one under ``model`` or
            ``state_dict``) loaded with ``weights_only=True``; without it the recipe pretrains.
        hidden: hidden widths for ``mlp`` (64 is plenty for 8x8 digits).
    """

    name: str
    checkpoint: str | None = None
    hidden: tuple[int, ...] = (64,)

    def __post_init__(self):
        name = self.name
        if name.startswith(TORCHVISION_PREFIX):
            check(name[len(TORCHVISION_PREFIX):].isidentifier(), "name",
                  f"expected torchvision:<builder> such as torchvision:resnet18, got {name!r}")
        else:
            check(name in ZOO or FACTORY_RE.fullmatch(name) is not None, "name",
                  f"unknown model {name!r}; allowed: {ALLOWED_FORMS}")
        check(self.checkpoint is None or self.checkpoint.strip() != "", "checkpoint",
              "must be a file path, got an empty string")
        check(all(h > 0 for h in self.hidden), "hidden", f"widths must be > 0, got {list(self.hidden)}")


# ----------------------------------------------------------------------------- build

def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Build the model ``cfg`` names for inputs of ``input_shape`` (C, H, W) and ``num_classes`` outputs.

    torchvision models get random weights (nothing is downloaded); when ``C != 3`` their
    first convolution is replaced by a freshly initialised one with ``C`` input channels
    and otherwise the same settings. A factory is called as
    ``fn(input_shape=..., num_classes=...)``, passing only the arguments it accepts.
    Then ``cfg.checkpoint``, if set, is loaded.

    Raises:
        RecipeError: on ``name``: unknown torchvision builder, factory not importable or not
            callable or not returning a module, input shape the model cannot take.
        InputError: the checkpoint is missing, unsafe or does not fit the model.
    """
    input_shape = tuple(int(d) for d in input_shape)
    if cfg.name in ZOO:
        model = ZOO[cfg.name](input_shape, num_classes, cfg)
    elif cfg.name.startswith(TORCHVISION_PREFIX):
        model = build_torchvision(cfg.name[len(TORCHVISION_PREFIX):], input_shape, num_classes)
    else:
        model = build_factory(cfg.name, input_shape, num_classes)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    return model


def build_torchvision(builder: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """``torchvision.models.get_model(builder, weights=None, num_classes=...)``, first conv fitted to C."""
    import torchvision

    allowed = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if builder not in allowed:
        examples = [m for m in ("resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "efficientnet_b0")
                    if m in allowed]
        raise RecipeError("name", f"unknown torchvision classification model {builder!r}; allowed e.g. "
                                  f"{', '.join(examples)} (all {len(allowed)}: torchvision.models.list_models())")
    try:
        model = torchvision.models.get_model(builder, weights=None, num_classes=num_classes)
    except (TypeError, ValueError) as e:
        raise RecipeError("name", f"torchvision:{builder} cannot be built with num_classes={num_classes}: "
                                  f"{first_line(e)}") from None
    if input_shape[0] != 3:
        replace_first_conv(model, input_shape[0], f"torchvision:{builder}")
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *input_shape))
    except Exception as e:  # noqa: BLE001 -- any failure here means "this input shape does not fit"
        raise RecipeError("name", f"torchvision:{builder} cannot take inputs of shape {input_shape}: "
                                  f"{first_line(e)}") from None
    finally:
        model.train(was_training)
    return model


def replace_first_conv(model: nn.Module, channels: int, name: str) -> None:
    """Swap the first 3-channel ``Conv2d`` (the stem) for one taking ``channels`` inputs.

    The new layer keeps kernel, stride, padding, dilation, bias and padding mode and is
    initialised by PyTorch's default; with ``weights=None`` nothing learned is lost.
    """
    for path, module in model.named_modules():
        if isinstance(module, nn.Conv2d) and module.in_channels == 3 and module.groups == 1:
            new = nn.Conv2d(channels, module.out_channels, module.kernel_size, stride=module.stride,
                            padding=module.padding, dilation=module.dilation, bias=module.bias is not None,
                            padding_mode=module.padding_mode)
            parent, _, attr = path.rpartition(".")
            setattr(model.get_submodule(parent), attr, new)
            return
    raise RecipeError("name", f"{name}: found no 3-channel first convolution to adapt to {channels} input channels")


def build_factory(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Import ``package.module`` and call ``function`` with the keyword arguments it accepts."""
    module_name, _, attr = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RecipeError("name", f"factory {name}: cannot import {module_name!r} ({first_line(e)}); "
                                  f"is it on PYTHONPATH?") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        raise RecipeError("name", f"factory {name}: module {module_name!r} has no callable {attr!r}")
    offered = {"input_shape": input_shape, "num_classes": num_classes}
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = offered
    else:
        kwargs = {k: v for k, v in offered.items() if k in params}
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise RecipeError("name", f"factory {name} returned {type(model).__name__}, expected a torch.nn.Module")
    return model


# ------------------------------------------------------------------------ checkpoints

def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place), refusing pickled code.

    Accepts a plain state_dict, or a dict holding one under ``"model"`` or
    ``"state_dict"``; a ``module.`` (DDP) or ``_orig_mod.`` (torch.compile) prefix on
    every key is removed.

    Returns:
        ``model``.

    Raises:
        InputError: the file is missing or unreadable, holds anything but tensors and plain
            containers (``weights_only`` refuses it; nothing in it is run), or a key or shape
            does not match the model (the first mismatch is named, with both shapes).
    """
    path = Path(path).expanduser()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise InputError(f"checkpoint {path}: no such file") from None
    except pickle.UnpicklingError as e:
        reason = refusal_reason(e)
        if "global" not in reason.lower():  # not a refused object: bytes that are no pickle at all
            raise InputError(f"checkpoint {path}: cannot read, not a torch checkpoint or damaged ({reason})") from None
        raise InputError(f"checkpoint {path}: not a plain tensor checkpoint, refused without running it "
                         f"({reason}); save one with torch.save(model.state_dict(), path)") from None
    except Exception as e:  # noqa: BLE001 -- torch raises RuntimeError, EOFError, OSError ... for damaged files
        raise InputError(f"checkpoint {path}: cannot read ({e.__class__.__name__}: {first_line(e)}); not a torch "
                         f"checkpoint, or damaged") from None
    state = extract_state_dict(obj, path)
    expected = model.state_dict()
    state = strip_prefix(state, expected)
    for key, tensor in expected.items():
        if key not in state:
            raise InputError(f"checkpoint {path}: key {key!r} missing (model shape {shape_str(tensor)}, "
                             f"checkpoint shape absent)")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise InputError(f"checkpoint {path}: key {key!r} has shape {shape_str(state[key])}, "
                             f"the model expects {shape_str(tensor)}")
    for key, tensor in state.items():
        if key not in expected:
            raise InputError(f"checkpoint {path}: unexpected key {key!r} (checkpoint shape {shape_str(tensor)}, "
                             f"absent from the model)")
    model.load_state_dict(state, strict=True)
    return model


def extract_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The state_dict inside a loaded checkpoint object."""
    for key in ("model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in obj.items()):
        raise InputError(f"checkpoint {path}: holds no state_dict (expected a dict of tensors, or one under "
                         f"'model' or 'state_dict')")
    return dict(obj)


def strip_prefix(state: dict[str, torch.Tensor], expected: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Remove a wrapper prefix that every key carries and the model's keys do not."""
    for prefix in ("module.", "_orig_mod."):
        if state and all(k.startswith(prefix) for k in state) and not any(k.startswith(prefix) for k in expected):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def save_checkpoint(obj: dict, path: str | Path) -> Path:
    """``torch.save(obj)`` atomically: write a temporary file in the same folder, then ``os.replace``.

    A crash mid-write leaves the previous checkpoint intact, never a truncated one.

    Returns:
        The path written.

    Raises:
        OutputError: the write failed (disk full, quota, read-only); ``path`` is untouched.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            sink = _KeepsWriteErrors(f)
            try:
                torch.save(obj, sink)
            except RuntimeError:
                if sink.error is not None:  # torch's zip writer turns a failed write (disk full) into this
                    raise sink.error from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, rundir.file_mode())  # mkstemp's 0600 would make checkpoints private
        failpoints.hit(f"write:{path.name}")
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not isinstance(e, OutputError):
            raise OutputError(e.errno, e.strerror, str(path)) from e
        raise
    return path


class _KeepsWriteErrors:
    """A file's ``write``, remembering the first ``OSError`` (which ``torch.save`` would replace by a RuntimeError)."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.f.flush()


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def shape_str(tensor: torch.Tensor) -> str:
    return "x".join(map(str, tensor.shape)) or "scalar"


def refusal_reason(e: BaseException) -> str:
    """The useful clause of torch's long weights_only refusal, e.g. ``Unsupported global: GLOBAL io.open``."""
    text = str(e)
    glob = re.search(r"unsupported GLOBAL (\S+?)(?: whose|[.,]?\s|$)", text, re.I)  # torch words it several ways
    if glob:
        return f"Unsupported global: GLOBAL {glob.group(1)}"
    match = re.search(r"WeightsUnpickler error:\s*(.*?)(?: was not an allowed global|\n|$)", text, re.S)
    return (match.group(1).strip() if match and match.group(1).strip() else first_line(e))[:160]


def first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, for one-line errors."""
    text = str(e).strip()
    return text.splitlines()[0].split(". ")[0].rstrip(".") if text else e.__class__.__name__
