"""CIFAR-style ResNets (3x3 stride-1 stem, no stem max-pool)."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet34", "resnet50"]


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential | None:
    # A projection shortcut only where the identity cannot be added as-is.
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3x3 Conv-BN layers with a residual connection.

    Every ReLU is its own module (never reused) and the residual is an
    out-of-place add, so each activation is a distinct named node in an fx graph.

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.relu2 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # Decided at construction time, so fx traces a single fixed branch.
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu2(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection.

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, 4 * planes, ceil(H / stride), ceil(W / stride))``.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_channels = planes * self.expansion
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.downsample = _downsample(in_channels, out_channels, stride)
        self.relu3 = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        out = out + identity
        return self.relu3(out)


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stem, four stages (64, 128, 256, 512 planes), linear head.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: Number of blocks in each of the four stages.
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Multiplier for the stage widths.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 28`` -> ``(B, num_classes)``.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        stem = scaled(64, width)
        self.conv1 = nn.Conv2d(in_channels, stem, kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=False)
        self._channels = stem
        self.layer1 = self._make_stage(block, scaled(64, width), num_blocks[0], stride=1)
        self.layer2 = self._make_stage(block, scaled(128, width), num_blocks[1], stride=2)
        self.layer3 = self._make_stage(block, scaled(256, width), num_blocks[2], stride=2)
        self.layer4 = self._make_stage(block, scaled(512, width), num_blocks[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(self._channels, num_classes)
        init_weights(self)

    def _make_stage(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
    ) -> nn.Sequential:
        layers: list[nn.Module] = []
        for i in range(blocks):
            layers.append(block(self._channels, planes, stride if i == 0 else 1))
            self._channels = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.flatten(self.avgpool(x))
        return self.fc(x)


@register_model("resnet18")
def resnet18(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet-18 (BasicBlock, 2-2-2-2)."""
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, in_channels, width)


@register_model("resnet34")
def resnet34(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet-34 (BasicBlock, 3-4-6-3)."""
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, in_channels, width)


@register_model("resnet50")
def resnet50(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> ResNet:
    """ResNet-50 (Bottleneck with expansion 4, 3-4-6-3)."""
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, in_channels, width)
