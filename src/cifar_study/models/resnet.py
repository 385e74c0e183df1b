"""ResNet18 for 32x32 images.

Follows the 18-layer network of He et al. 2016, "Deep Residual Learning for Image
Recognition": four stages of two BasicBlocks (two 3x3 convolutions with batch norm)
with 64, 128, 256 and 512 channels, 1x1 convolution + batch norm projections on the
shortcuts that change shape, global average pooling and a Linear head.

Departures from the paper:
- The stem is one 3x3 convolution with stride 1 in place of the ImageNet 7x7
  stride-2 convolution, and there is no max-pool, so the four stages work on feature maps
  of 32, 16, 8 and 4 pixels per side.
- The paper's own CIFAR-10 networks (6n+2 layers, such as ResNet-20 and
  ResNet-110) have 16, 32 and 64 channels and zero-padded identity shortcuts.
  This one keeps the ImageNet widths and projection shortcuts instead, which
  gives 11,173,962 parameters with 10 classes.

Parameter names follow torchvision's `resnet.py`: `conv1`, `bn1`, `layer1` to
`layer4`, `downsample` on the projection shortcuts and `fc` for the head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .common import check_int_sequence, check_positive_int


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and a shortcut, ReLU after the sum."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)

        self.downsample: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.downsample(x))


def make_stage(in_channels: int, out_channels: int, num_blocks: int, stride: int) -> nn.Sequential:
    """Build `num_blocks` BasicBlocks, the first of which applies `stride`."""
    stage = [BasicBlock(in_channels, out_channels, stride)]
    stage += [BasicBlock(out_channels, out_channels) for _ in range(num_blocks - 1)]
    return nn.Sequential(*stage)


class ResNet18(nn.Module):
    """CIFAR ResNet: 3x3 stem, four stages of BasicBlocks, global average pooling, Linear head.

    `widths` and `blocks` give the channels and the number of BasicBlocks of each
    stage. The first stage keeps the resolution and every later stage halves it.
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (2, 2, 2, 2),
    ) -> None:
        super().__init__()
        check_positive_int("num_classes", num_classes)
        check_positive_int("in_channels", in_channels)
        widths = check_int_sequence("widths", widths)
        blocks = check_int_sequence("blocks", blocks)
        for option, values in (("widths", widths), ("blocks", blocks)):
            if len(values) != 4:
                raise ValueError(
                    f"{option}={values!r} has {len(values)} entries. Give 4, one per stage"
                )

        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)

        self.layer1 = make_stage(widths[0], widths[0], blocks[0], stride=1)
        self.layer2 = make_stage(widths[0], widths[1], blocks[1], stride=2)
        self.layer3 = make_stage(widths[1], widths[2], blocks[2], stride=2)
        self.layer4 = make_stage(widths[2], widths[3], blocks[3], stride=2)

        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)

        # The initialisation of torchvision's resnet.py: He normal (fan_out) for convolutions.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x).flatten(1)
        return self.fc(x)
