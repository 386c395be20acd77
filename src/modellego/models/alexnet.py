"""AlexNet adapted to small (28-64 px) images."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["AlexNet", "alexnet"]


class AlexNet(nn.Module):
    """Small-image AlexNet: five ReLU convs (no BN), three 2x2 max-pools, 3-layer MLP head.

    The stride-4 11x11 stem of the ImageNet model would leave nothing of a 32x32
    image, so the stem is a stride-1 5x5 conv and the pools halve 32 -> 16 -> 8 -> 4.
    There is no dropout, so only the (absent) normalisation layers could make train and
    eval mode differ: the model computes the same function in both.

    Args:
        num_classes: Number of output logits.
        in_channels: Number of input image channels.
        width: Channel multiplier for every hidden layer.

    Shape:
        ``(B, in_channels, H, W)`` with ``H, W >= 28`` -> ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        c1, c2, c3, c4, c5 = (scaled(c, width) for c in (64, 192, 384, 256, 256))
        hidden = scaled(1024, width)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
                relu1=nn.ReLU(inplace=False),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(c1, c2, kernel_size=5, padding=2),
                relu2=nn.ReLU(inplace=False),
                pool2=nn.MaxPool2d(2),
                conv3=nn.Conv2d(c2, c3, kernel_size=3, padding=1),
                relu3=nn.ReLU(inplace=False),
                conv4=nn.Conv2d(c3, c4, kernel_size=3, padding=1),
                relu4=nn.ReLU(inplace=False),
                conv5=nn.Conv2d(c4, c5, kernel_size=3, padding=1),
                relu5=nn.ReLU(inplace=False),
                pool3=nn.MaxPool2d(2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(c5, hidden),
                relu1=nn.ReLU(inplace=False),
                fc2=nn.Linear(hidden, hidden),
                relu2=nn.ReLU(inplace=False),
                fc3=nn.Linear(hidden, num_classes),
            )
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x)


@register_model("alexnet")
def alexnet(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> AlexNet:
    """Small-image AlexNet (about 3.8M parameters at width 1)."""
    return AlexNet(num_classes=num_classes, in_channels=in_channels, width=width)
