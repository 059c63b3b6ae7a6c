"""Model factories for tests of ``[model] name = "package.module:function"``."""
from torch import nn


def make(input_shape, num_classes):
    """Takes the shape arguments, as a factory that adapts to the data would."""
    return nn.Sequential(nn.Flatten(), nn.Linear(input_shape[0] * input_shape[1] * input_shape[2], num_classes))


def make_fixed():
    """Takes no arguments: build() must call it bare."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


def make_kwargs(**kwargs):
    """Accepts anything: build() passes both arguments."""
    c, h, w = kwargs["input_shape"]
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, kwargs["num_classes"]))


def not_a_model():
    return "hello"


NOT_CALLABLE = 3
