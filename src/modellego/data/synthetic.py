"""A small seeded synthetic dataset whose classes a tiny CNN can tell apart."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import UserError
from ._common import Arrays, RawData, check_arrays


@dataclass(frozen=True)
class SyntheticSpec:
    """Sizes of the synthetic dataset.

    Attributes:
        num_classes: number of classes.
        channels: image channels (1 or 3).
        image_size: height and width.
        train_per_class: train images per class (validation is carved from these).
        test_per_class: test images per class.
        noise: standard deviation of the pixel noise, in [0, 1] units.
        seed: seed of the images; None uses `load_dataset`'s seed.
    """

    num_classes: int = 10
    channels: int = 3
    image_size: int = 32
    train_per_class: int = 200
    test_per_class: int = 50
    noise: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.num_classes < 2 or self.channels not in (1, 3) or self.image_size < 4:
            raise UserError(
                f"SyntheticSpec needs num_classes >= 2, channels 1 or 3 and image_size >= 4, found "
                f"{self.num_classes}, {self.channels}, {self.image_size}."
            )
        if self.train_per_class < 1 or self.test_per_class < 0 or self.noise < 0:
            raise UserError(
                "SyntheticSpec needs train_per_class >= 1, test_per_class >= 0 and noise >= 0, found "
                f"{self.train_per_class}, {self.test_per_class}, {self.noise}."
            )


def _prototypes(spec: SyntheticSpec, g: torch.Generator) -> torch.Tensor:
    """One (C, S, S) pattern per class: an oriented grating in a class colour plus a coarse blotch."""
    k, c, s = spec.num_classes, spec.channels, spec.image_size
    yy, xx = torch.meshgrid(torch.linspace(0, 1, s), torch.linspace(0, 1, s), indexing="ij")
    theta = torch.arange(k) * math.pi / k
    freq = 2.0 + torch.arange(k) % 3
    phase = 2 * math.pi * torch.rand(k, generator=g)
    wave = torch.sin(
        2 * math.pi * freq[:, None, None] * (xx * theta.cos()[:, None, None] + yy * theta.sin()[:, None, None])
        + phase[:, None, None]
    )
    colour = 0.4 + 0.6 * torch.rand(k, c, generator=g)
    coarse = F.interpolate(torch.rand(k, c, 4, 4, generator=g) * 2 - 1, size=(s, s), mode="bilinear")
    return 0.5 + 0.3 * colour[:, :, None, None] * wave[:, None] + 0.15 * coarse


def _samples(protos: torch.Tensor, per_class: int, noise: float, g: torch.Generator) -> Arrays:
    k, c, s, _ = protos.shape
    labels = torch.arange(k).repeat_interleave(per_class)
    labels = labels[torch.randperm(len(labels), generator=g)]
    n = len(labels)
    # Each sample: its class pattern, cyclically shifted by up to 2 pixels, with random contrast and noise.
    dy, dx = torch.randint(-2, 3, (2, n), generator=g)
    rows = (torch.arange(s) - dy[:, None]) % s
    cols = (torch.arange(s) - dx[:, None]) % s
    x = protos[labels[:, None, None], :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
    x = 0.5 + (x - 0.5) * contrast + noise * torch.randn(x.shape, generator=g)
    images = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return check_arrays(images.numpy(), labels.numpy(), k, "synthetic")


def make_synthetic(spec: SyntheticSpec, seed: int) -> RawData:
    """Generate the synthetic train and test arrays; identical for identical (spec, seed)."""
    g = torch.Generator().manual_seed(spec.seed if spec.seed is not None else seed)
    protos = _prototypes(spec, g)
    train = _samples(protos, spec.train_per_class, spec.noise, g)
    test = _samples(protos, spec.test_per_class, spec.noise, g)
    return RawData(tuple(f"class{i}" for i in range(spec.num_classes)), train, test)
