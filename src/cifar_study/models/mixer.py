"""MLP-Mixer for small images.

Follows Tolstikhin et al. 2021, "MLP-Mixer: An all-MLP Architecture for Vision":
a per-patch linear embedding, then `num_blocks` Mixer layers, each a token-mixing
MLP across patches and a channel-mixing MLP across features. Each MLP is
Linear -> GELU -> Linear with a LayerNorm before it and a skip connection around
it. A final LayerNorm, global average pooling over patches and a Linear head
classify the image.

Departures from the paper:
- The paper sets the hidden widths of the token-mixing and channel-mixing MLPs
  (D_S and D_C) directly. Here `mlp_ratios` gives them as multiples of
  `embed_dim`, rounded down, as timm's `mlp_mixer.py` does. The default
  (0.5, 4.0) is timm's default too, and gives 384 and 3072 for Mixer-B/16
  (embed_dim 768).
- Dropout after each Linear of both MLPs (0 by default) and the activation
  (GELU by default) are options.
- The model is sized for 32x32 images with small patches (2 to 16 pixels). The
  weights and the LayerNorm eps (1e-5) keep PyTorch's defaults, where timm uses
  its own initialisation and eps 1e-6.

With the defaults and 10 classes, the model has 2,376,458 parameters at patch
size 2, 2,188,298 at 4 and 2,175,818 at 8.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Real

import torch
from torch import nn

from .common import check_activation, check_dropout, check_positive_int, make_activation


class MixerMLP(nn.Module):
    """Linear -> activation -> dropout -> Linear -> dropout, on the last dimension."""

    def __init__(self, features: int, hidden: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(features, hidden)
        self.activation = make_activation(activation)
        self.fc2 = nn.Linear(hidden, features)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.activation(self.fc1(x)))
        return self.dropout(self.fc2(x))


class MixerBlock(nn.Module):
    """LayerNorm + token-mixing MLP, then LayerNorm + channel-mixing MLP, each with a skip connection."""

    def __init__(
        self,
        num_patches: int,
        embed_dim: int,
        token_hidden: int,
        channel_hidden: int,
        activation: str,
        dropout: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(embed_dim)
        self.token_mixing = MixerMLP(num_patches, token_hidden, activation, dropout)
        self.norm2 = nn.LayerNorm(embed_dim)
        self.channel_mixing = MixerMLP(embed_dim, channel_hidden, activation, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x is (batch, patches, embed_dim), so token mixing transposes to act on the patch axis.
        x = x + self.token_mixing(self.norm1(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mixing(self.norm2(x))


class MLPMixer(nn.Module):
    """Patch embedding, `num_blocks` MixerBlocks, LayerNorm, mean over patches, Linear head.

    `mlp_ratios` gives the hidden widths of the token-mixing and channel-mixing MLPs
    as multiples of `embed_dim`: `int(ratio * embed_dim)`.
    """

    def __init__(
        self,
        patch_size: int = 4,
        embed_dim: int = 256,
        num_blocks: int = 4,
        mlp_ratios: Sequence[float] = (0.5, 4.0),
        dropout: float = 0.0,
        activation: str = "gelu",
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        for option, value in (
            ("patch_size", patch_size),
            ("embed_dim", embed_dim),
            ("num_blocks", num_blocks),
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("in_channels", in_channels),
        ):
            check_positive_int(option, value)
        check_patch_size(patch_size, image_size)
        token_hidden, channel_hidden = hidden_widths(mlp_ratios, embed_dim)
        check_dropout(dropout)
        check_activation(activation)

        num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, embed_dim, patch_size, stride=patch_size)
        self.blocks = nn.Sequential(
            *(
                MixerBlock(num_patches, embed_dim, token_hidden, channel_hidden, activation, dropout)
                for _ in range(num_blocks)
            )
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head = nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (batch, embed_dim, rows, cols) -> (batch, patches, embed_dim), patches in row-major order.
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(self.blocks(x))
        return self.head(x.mean(dim=1))


def check_patch_size(patch_size: int, image_size: int) -> None:
    """Raise ValueError unless `patch_size` divides `image_size`."""
    if image_size % patch_size != 0:
        divisors = [d for d in range(1, image_size + 1) if image_size % d == 0]
        raise ValueError(
            f"patch_size={patch_size} does not divide image_size={image_size}. "
            f"Use one of its divisors: {', '.join(map(str, divisors))}"
        )


def hidden_widths(mlp_ratios: Sequence[float], embed_dim: int) -> tuple[int, int]:
    """Return the token-mixing and channel-mixing hidden widths, `int(ratio * embed_dim)` each."""
    ratios = tuple(mlp_ratios) if isinstance(mlp_ratios, Sequence) else ()
    is_valid = len(ratios) == 2 and all(
        isinstance(r, Real) and not isinstance(r, bool) and r > 0 for r in ratios
    )
    if not is_valid:
        raise ValueError(
            f"mlp_ratios={mlp_ratios!r} is invalid. Use two positive numbers "
            "(token-mixing, channel-mixing), such as (0.5, 4.0)"
        )

    widths = (int(ratios[0] * embed_dim), int(ratios[1] * embed_dim))
    if min(widths) < 1:
        raise ValueError(
            f"mlp_ratios={mlp_ratios!r} with embed_dim={embed_dim} gives hidden widths "
            f"{widths}. Each ratio times embed_dim must be at least 1"
        )
    return widths
