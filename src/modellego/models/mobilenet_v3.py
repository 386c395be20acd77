"""MobileNetV3-Small for small images: squeeze-and-excitation gates, hard-swish, depthwise 3×3/5×5.

The block layout follows Howard et al., "Searching for MobileNetV3" (2019), Table 2; the stem and
the first two stages keep stride 1 so that 28×28 and 32×32 inputs do not shrink to nothing.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .mobilenet import InvertedResidual
from .registry import init_weights, register_model, scaled

__all__ = ["MobileNetV3Small", "mobilenet_v3_small"]

# (kernel, expanded channels, output channels, squeeze-and-excite, hard-swish, stride).
# ImageNet strides are 2, 2, 2, 2 at rows 1, 2, 4, 9 (and 2 in the stem); here 1, 2, 2, 2.
MOBILENET_V3_SMALL_CONFIG: tuple[tuple[int, int, int, bool, bool, int], ...] = (
    (3, 16, 16, True, False, 1),
    (3, 72, 24, False, False, 2),
    (3, 88, 24, False, False, 1),
    (5, 96, 40, True, True, 2),
    (5, 240, 40, True, True, 1),
    (5, 240, 40, True, True, 1),
    (5, 120, 48, True, True, 1),
    (5, 144, 48, True, True, 1),
    (5, 288, 96, True, True, 2),
    (5, 576, 96, True, True, 1),
    (5, 576, 96, True, True, 1),
)


class MobileNetV3Small(nn.Module):
    """CIFAR-style MobileNetV3-Small.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Multiplier for every channel count, the squeeze widths and the 1024-wide head included.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 16`` -> ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        stem = scaled(16, width)
        self.stem = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(in_channels, stem, 3, padding=1, bias=False),
            bn=nn.BatchNorm2d(stem),
            act=nn.Hardswish(),
        ))
        blocks: list[nn.Module] = []
        channels = stem
        for kernel, hidden, out, se, hs, stride in MOBILENET_V3_SMALL_CONFIG:
            out, hidden = scaled(out, width), scaled(hidden, width)
            # The gate is a quarter of the expanded width (torchvision also rounds it up to a multiple
            # of 8, which would widen the gates of width-scaled models past their blocks).
            blocks.append(InvertedResidual(channels, out, stride, hidden, kernel=kernel,
                                           activation=nn.Hardswish if hs else nn.ReLU,
                                           squeeze=max(1, hidden // 4) if se else 0))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        last, hidden = scaled(576, width), scaled(1024, width)
        self.head = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(channels, last, 1, bias=False),
            bn=nn.BatchNorm2d(last),
            act=nn.Hardswish(),
        ))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(OrderedDict(
            fc1=nn.Linear(last, hidden),
            act=nn.Hardswish(),
            dropout=nn.Dropout(0.2),
            fc2=nn.Linear(hidden, num_classes),
        ))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.blocks(self.stem(x)))
        return self.classifier(self.flatten(self.avgpool(x)))


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> MobileNetV3Small:
    """CIFAR-style MobileNetV3-Small (about 1.5M parameters at width 1)."""
    return MobileNetV3Small(num_classes=num_classes, in_channels=in_channels, width=width)
