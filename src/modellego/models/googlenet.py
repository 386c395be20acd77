"""GoogLeNet (Inception v1) for small images, following the common CIFAR layout."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["GoogLeNet", "Inception", "googlenet"]


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(
                in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False
            ),
            bn=nn.BatchNorm2d(out_channels),
            relu=nn.ReLU(inplace=False),
        )
    )


class Inception(nn.Module):
    """Four parallel branches concatenated along channels.

    Branches: 1x1; 1x1 -> 3x3; 1x1 -> 3x3 -> 3x3 (the factorised 5x5);
    3x3 max-pool -> 1x1. All channel counts are already width-scaled.

    Shape:
        ``(B, in_channels, H, W)`` -> ``(B, out_channels, H, W)`` with
        ``out_channels = n1x1 + n3x3 + n5x5 + pool_proj``.
    """

    def __init__(
        self,
        in_channels: int,
        n1x1: int,
        n3x3_reduce: int,
        n3x3: int,
        n5x5_reduce: int,
        n5x5: int,
        pool_proj: int,
    ) -> None:
        super().__init__()
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_proj
        self.b1 = nn.Sequential(OrderedDict(conv1=_conv_bn_relu(in_channels, n1x1, 1)))
        self.b2 = nn.Sequential(
            OrderedDict(
                reduce=_conv_bn_relu(in_channels, n3x3_reduce, 1),
                conv3=_conv_bn_relu(n3x3_reduce, n3x3, 3),
            )
        )
        self.b3 = nn.Sequential(
            OrderedDict(
                reduce=_conv_bn_relu(in_channels, n5x5_reduce, 1),
                conv3a=_conv_bn_relu(n5x5_reduce, n5x5, 3),
                conv3b=_conv_bn_relu(n5x5, n5x5, 3),
            )
        )
        self.b4 = nn.Sequential(
            OrderedDict(
                pool=nn.MaxPool2d(3, stride=1, padding=1),
                proj=_conv_bn_relu(in_channels, pool_proj, 1),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


# (n1x1, n3x3_reduce, n3x3, n5x5_reduce, n5x5, pool_proj) of each Inception module.
_INCEPTION_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "a3": (64, 96, 128, 16, 32, 32),
    "b3": (128, 128, 192, 32, 96, 64),
    "a4": (192, 96, 208, 16, 48, 64),
    "b4": (160, 112, 224, 24, 64, 64),
    "c4": (128, 128, 256, 24, 64, 64),
    "d4": (112, 144, 288, 32, 64, 64),
    "e4": (256, 160, 320, 32, 128, 128),
    "a5": (256, 160, 320, 32, 128, 128),
    "b5": (384, 192, 384, 48, 128, 128),
}


class GoogLeNet(nn.Module):
    """Small-image GoogLeNet: 3x3 stem (192), inception a3-b3, pool, a4-e4, pool, a5-b5.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Multiplier for every branch width.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 28`` -> ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        stem = scaled(192, width)
        self.pre_layers = _conv_bn_relu(in_channels, stem, 3)

        def inception(name: str, channels: int) -> Inception:
            return Inception(channels, *(scaled(c, width) for c in _INCEPTION_CONFIGS[name]))

        self.a3 = inception("a3", stem)
        self.b3 = inception("b3", self.a3.out_channels)
        # Two separate pool modules (not one reused) so each has its own fx node name.
        self.maxpool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = inception("a4", self.b3.out_channels)
        self.b4 = inception("b4", self.a4.out_channels)
        self.c4 = inception("c4", self.b4.out_channels)
        self.d4 = inception("d4", self.c4.out_channels)
        self.e4 = inception("e4", self.d4.out_channels)
        self.maxpool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a5 = inception("a5", self.e4.out_channels)
        self.b5 = inception("b5", self.a5.out_channels)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.linear = nn.Linear(self.b5.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_layers(x)
        x = self.b3(self.a3(x))
        x = self.maxpool3(x)
        x = self.e4(self.d4(self.c4(self.b4(self.a4(x)))))
        x = self.maxpool4(x)
        x = self.b5(self.a5(x))
        x = self.flatten(self.avgpool(x))
        return self.linear(x)


@register_model("googlenet")
def googlenet(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> GoogLeNet:
    """Small-image GoogLeNet (about 6.2M parameters at width 1)."""
    return GoogLeNet(num_classes=num_classes, in_channels=in_channels, width=width)
