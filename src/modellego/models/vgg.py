"""VGG with batch norm (CIFAR-style head) for small images."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["VGG", "VGG_CONFIGS", "vgg11_bn", "vgg13_bn", "vgg16_bn", "vgg19_bn"]

# Standard VGG configurations: ints are 3x3 conv widths, "M" is a 2x2 max-pool.
VGG_CONFIGS: dict[str, tuple[int | str, ...]] = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
        512, 512, 512, "M", 512, 512, 512, "M",
    ),  # fmt: skip
    "vgg19": (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
    ),  # fmt: skip
}


class VGG(nn.Module):
    """VGG: Conv3x3-BN-ReLU stacks and max-pools, global average pool, 3-layer MLP head.

    Max-pools use ``ceil_mode=True`` so five of them still leave a 1x1 map for a
    28x28 input (28 -> 14 -> 7 -> 4 -> 2 -> 1) instead of shrinking it to zero.

    Args:
        config: Sequence of conv widths and ``"M"`` (max-pool) markers.
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Channel multiplier for every hidden layer.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 28`` -> ``(B, num_classes)``.
    """

    def __init__(
        self,
        config: Sequence[int | str],
        num_classes: int = 10,
        in_channels: int = 3,
        width: float = 1.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        layers: list[nn.Module] = []
        channels = in_channels
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = scaled(int(item), width)
                layers += [
                    nn.Conv2d(channels, out, kernel_size=3, padding=1, bias=False),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=False),
                ]
                channels = out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        hidden = scaled(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(channels, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x)


@register_model("vgg11_bn")
def vgg11_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG-11 with batch norm."""
    return VGG(VGG_CONFIGS["vgg11"], num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("vgg13_bn")
def vgg13_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG-13 with batch norm."""
    return VGG(VGG_CONFIGS["vgg13"], num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("vgg16_bn")
def vgg16_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG-16 with batch norm."""
    return VGG(VGG_CONFIGS["vgg16"], num_classes=num_classes, in_channels=in_channels, width=width)


@register_model("vgg19_bn")
def vgg19_bn(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> VGG:
    """VGG-19 with batch norm."""
    return VGG(VGG_CONFIGS["vgg19"], num_classes=num_classes, in_channels=in_channels, width=width)
