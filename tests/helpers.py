"""Helpers shared by the tests."""
from __future__ import annotations

import torch
import torch.nn as nn

import modellego
from modellego.io.info import InputSpec, get_info, set_info


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so BatchNorm slicing matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(0.3 * (torch.rand(n, generator=g) - 0.5))
    return model


def described_model(name: str, width: float, seed: int, *, num_classes: int, channels: int = 1,
                    size: tuple[int, int] = (28, 28), mean: float = 0.1, std: float = 0.3,
                    dataset: str | None = None) -> nn.Module:
    """A seeded zoo model in eval mode, randomised BatchNorm, with an input description (and a dataset name)."""
    torch.manual_seed(seed)
    model = randomise_bn(modellego.create_model(name, num_classes=num_classes, in_channels=channels, width=width), seed)
    info = get_info(model).replace(input=InputSpec(channels, size, (mean,) * channels, (std,) * channels))
    return set_info(model.eval(), info.replace(dataset=dataset) if dataset is not None else info)
