"""LeNet-5 for small grey-scale or colour images."""
from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .registry import init_weights, register_model, scaled

__all__ = ["LeNet5", "lenet5"]


class LeNet5(nn.Module):
    """LeNet-5 with ReLU and max-pooling.

    The 5x5 adaptive average pool keeps the classic ``C*5*5`` flatten for any
    input size, so the first Linear layer's inputs map back to conv channels in
    blocks of 25.

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
        c1, c2 = scaled(6, width), scaled(16, width)
        f1, f2 = scaled(120, width), scaled(84, width)
        self.features = nn.Sequential(
            OrderedDict(
                conv1=nn.Conv2d(in_channels, c1, kernel_size=5, padding=2),
                relu1=nn.ReLU(inplace=False),
                pool1=nn.MaxPool2d(2),
                conv2=nn.Conv2d(c1, c2, kernel_size=5),
                relu2=nn.ReLU(inplace=False),
                pool2=nn.MaxPool2d(2),
            )
        )
        self.avgpool = nn.AdaptiveAvgPool2d(5)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            OrderedDict(
                fc1=nn.Linear(c2 * 25, f1),
                relu1=nn.ReLU(inplace=False),
                fc2=nn.Linear(f1, f2),
                relu2=nn.ReLU(inplace=False),
                fc3=nn.Linear(f2, num_classes),
            )
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.flatten(self.avgpool(x))
        return self.classifier(x)


@register_model("lenet5")
def lenet5(*, num_classes: int = 10, in_channels: int = 3, width: float = 1.0) -> LeNet5:
    """LeNet-5 (about 62k parameters at width 1, 3 input channels, 10 classes)."""
    return LeNet5(num_classes=num_classes, in_channels=in_channels, width=width)
