"""MobileNetV2 for small images (stride-1 stem and first stride-2 stage set to 1)."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["InvertedResidual", "MobileNetV2", "SqueezeExcite", "mobilenet_v2"]

# (expansion t, output channels c, repeats n, first stride s). The ImageNet
# config has s=2 in the second row; 1 here keeps 32x32 inputs from shrinking too fast.
MOBILENET_V2_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class SqueezeExcite(nn.Module):
    """x · gate(W2 · relu(W1 · mean(x))): a per-channel gate computed from the map itself.

    Shape: ``(B, C, H, W)`` -> ``(B, C, H, W)``; the gate is ``(B, C, 1, 1)``.
    """

    def __init__(self, channels: int, squeezed: int, gate: type[nn.Module] = nn.Hardsigmoid) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.relu = nn.ReLU(inplace=False)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(self.expand(self.relu(self.reduce(self.pool(x)))))  # (B, C, 1, 1)
        return x * g


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise k×k -> optional squeeze-and-excitation -> linear project 1x1, with BN
    after each conv.

    The expand conv is omitted when the hidden width equals the input's (MobileNetV2's expansion
    ratio 1, as in the reference model), so the depthwise conv always has
    ``groups == in == out``.

    Args:
        in_channels, out_channels, stride: of the block.
        hidden: the expanded width.
        kernel: the depthwise kernel size.
        activation: after the expand and depthwise convs (MobileNetV2: ReLU6).
        squeeze: width of the squeeze-and-excitation gate after the depthwise conv (0: none).

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, ceil(H / stride), ceil(W / stride))``.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, hidden: int, *, kernel: int = 3,
                 activation: type[nn.Module] = nn.ReLU6, squeeze: int = 0) -> None:
        super().__init__()
        # Fixed at construction, so the traced graph has a single static branch.
        self.use_residual = stride == 1 and in_channels == out_channels
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        if hidden != in_channels:
            layers["expand_conv"] = nn.Conv2d(in_channels, hidden, 1, bias=False)
            layers["expand_bn"] = nn.BatchNorm2d(hidden)
            layers["expand_act"] = activation()
        layers["dw_conv"] = nn.Conv2d(
            hidden, hidden, kernel, stride=stride, padding=kernel // 2, groups=hidden, bias=False
        )
        layers["dw_bn"] = nn.BatchNorm2d(hidden)
        layers["dw_act"] = activation()
        if squeeze:
            layers["se"] = SqueezeExcite(hidden, squeeze)
        # Linear bottleneck: no activation after the projection.
        layers["project_conv"] = nn.Conv2d(hidden, out_channels, 1, bias=False)
        layers["project_bn"] = nn.BatchNorm2d(out_channels)
        self.conv = nn.Sequential(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.use_residual:
            out = out + x
        return out


class MobileNetV2(nn.Module):
    """CIFAR-style MobileNetV2.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Multiplier for every channel count, including the final 1280.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 28`` -> ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        stem = scaled(32, width)
        self.stem = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(in_channels, stem, 3, stride=1, padding=1, bias=False),
                bn=nn.BatchNorm2d(stem),
                relu=nn.ReLU6(inplace=False),
            )
        )
        blocks: list[nn.Module] = []
        channels = stem
        for t, c, n, s in MOBILENET_V2_CONFIG:
            out = scaled(c, width)
            for i in range(n):
                blocks.append(InvertedResidual(channels, out, s if i == 0 else 1, channels * t))
                channels = out
        self.blocks = nn.Sequential(*blocks)
        last = scaled(1280, width)
        self.head = nn.Sequential(
            OrderedDict(
                conv=nn.Conv2d(channels, last, 1, bias=False),
                bn=nn.BatchNorm2d(last),
                relu=nn.ReLU6(inplace=False),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.blocks(x)
        x = self.head(x)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x)


@register_model("mobilenet_v2")
def mobilenet_v2(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV2:
    """CIFAR-style MobileNetV2 (about 2.2M parameters at width 1)."""
    return MobileNetV2(num_classes=num_classes, in_channels=in_channels, width=width)
