"""The three classifiers of the study, built by name from a run's settings."""

from __future__ import annotations

from torch import nn

from .common import ACTIVATIONS, make_activation
from .mixer import MLPMixer
from .mlp import MLP
from .resnet import ResNet18

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLP,
    "resnet18": ResNet18,
    "mlpmixer": MLPMixer,
}

__all__ = [
    "ACTIVATIONS",
    "MLP",
    "MLPMixer",
    "MODELS",
    "ResNet18",
    "build_model",
    "count_parameters",
    "make_activation",
]


def build_model(name: str, **kwargs) -> nn.Module:
    """Build the model called `name` with `kwargs` passed to its constructor."""
    if name not in MODELS:
        valid = ", ".join(MODELS)
        raise ValueError(f"model={name!r} is unknown. Use one of {valid}")
    return MODELS[name](**kwargs)


def count_parameters(model: nn.Module) -> int:
    """Return the number of trainable parameters (those with requires_grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
