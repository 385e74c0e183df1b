"""Multilayer perceptron on flattened images.

Fully connected layers with one activation throughout. Weights are Glorot-normal
(`torch.nn.init.xavier_normal_`): normal with the variance 2 / (fan_in + fan_out)
that Glorot and Bengio 2010, "Understanding the difficulty of training deep
feedforward neural networks", derive. Biases start at zero.
The hidden sizes, the activation and the dropout after each hidden layer are
constructor arguments. Parameters are named `layers.<i>.weight` for the hidden
layers, in order from the input, and `head.weight` for the classifier.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import check_dropout, check_int_sequence, check_positive_int, make_activation


class MLP(nn.Module):
    """Flatten, then `len(hidden_sizes)` Linear + activation + dropout layers, then a Linear head."""

    def __init__(
        self,
        hidden_sizes: Sequence[int] = (1024, 512, 64, 64),
        activation: str = "relu",
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_sizes = check_int_sequence("hidden_sizes", hidden_sizes)
        check_positive_int("num_classes", num_classes)
        check_positive_int("image_size", image_size)
        check_positive_int("in_channels", in_channels)
        check_dropout(dropout)

        in_features = in_channels * image_size * image_size
        widths = (in_features, *hidden_sizes)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(widths[:-1], widths[1:])
        )
        self.activation = make_activation(activation)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1], num_classes)

        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # flatten follows the logical (C, H, W) order, so a channels_last input gives the same features.
        x = x.flatten(1)
        for layer in self.layers:
            x = self.dropout(self.activation(layer(x)))
        return self.head(x)
