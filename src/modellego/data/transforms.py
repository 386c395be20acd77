"""Batch transforms in plain torch on float images (B, C, H, W).

Every transform is a callable ``t(x, generator=None)``; random ones draw from
`generator` (any device) so that a seeded generator gives repeatable batches.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from ..errors import UserError, unknown_name

Size = int | tuple[int, int]


class Transform(Protocol):
    """A batch transform: ``t(x, generator=None)``."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1]; float input is returned unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def _pair(size: Size) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise UserError(f"image size must be positive, found {size}.")
    return int(h), int(w)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # Draw on the generator's device (a CPU generator cannot fill a CUDA tensor), then move.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(shape, generator=generator, device=gen_device).to(device)


class Compose:
    """Apply transforms in order, passing the generator to each."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        return f"Compose({self.transforms!r})"


class Pad:
    """Zero-pad every side by `padding` pixels."""

    def __init__(self, padding: int) -> None:
        if padding < 0:
            raise UserError(f"padding must be >= 0, found {padding}.")
        self.padding = int(padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        p = self.padding
        return F.pad(x, (p, p, p, p)) if p else x

    def __repr__(self) -> str:
        return f"Pad({self.padding})"


class RandomCrop:
    """Pad, then crop each sample at its own random offset.

    Args:
        size: output (H, W) or one int; None keeps the input size.
        padding: zero padding added first.
    """

    def __init__(self, size: Size | None = None, padding: int = 0) -> None:
        self.size = _pair(size) if size is not None else None
        self.pad = Pad(padding)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        h, w = self.size or tuple(x.shape[-2:])
        x = self.pad(x)
        b, _, ph, pw = x.shape
        if h > ph or w > pw:
            raise UserError(f"RandomCrop size {(h, w)} is larger than the padded image {(ph, pw)}.")
        oy = (_rand((b,), generator, x.device) * (ph - h + 1)).long()
        ox = (_rand((b,), generator, x.device) * (pw - w + 1)).long()
        rows = oy[:, None] + torch.arange(h, device=x.device)
        cols = ox[:, None] + torch.arange(w, device=x.device)
        # Advanced indexing gathers (B, h, w, C) in one go; no per-sample loop.
        out = x[torch.arange(b, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
        return out.permute(0, 3, 1, 2).contiguous()

    def __repr__(self) -> str:
        return f"RandomCrop({self.size}, padding={self.pad.padding})"


class RandomHorizontalFlip:
    """Mirror each sample left-right with probability `p`."""

    def __init__(self, p: float = 0.5) -> None:
        if not 0 <= p <= 1:
            raise UserError(f"flip probability must be in [0, 1], found {p}.")
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        flip = _rand((x.shape[0],), generator, x.device) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip({self.p})"


class Resize:
    """Bilinear resize (antialiased when shrinking) to `size`."""

    def __init__(self, size: Size) -> None:
        self.size = _pair(size)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(x.shape[-2:]) == self.size:
            return x
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)

    def __repr__(self) -> str:
        return f"Resize({self.size})"


class Normalize:
    """``(x - mean) / std`` per channel; one value applies to every channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or not mean:
            raise UserError(f"mean and std need the same, non-zero length, found {len(mean)} and {len(std)}.")
        if min(std) <= 0:
            raise UserError(f"std must be positive, found {tuple(std)}.")
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.mean.shape[1] not in (1, x.shape[1]):
            raise UserError(
                f"Normalize has {self.mean.shape[1]} channel values but the images have {x.shape[1]} channels."
            )
        mean, std = self.mean.to(x.device, x.dtype), self.std.to(x.device, x.dtype)
        return (x - mean) / std

    def __repr__(self) -> str:
        return f"Normalize({self.mean.flatten().tolist()}, {self.std.flatten().tolist()})"


class GreyToRGB:
    """Repeat a single channel three times; three-channel input passes through."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if x.shape[1] == 3:
            return x
        if x.shape[1] != 1:
            raise UserError(f"GreyToRGB expects 1 or 3 channels, found {x.shape[1]}.")
        return x.expand(-1, 3, -1, -1)

    def __repr__(self) -> str:
        return "GreyToRGB()"


def preprocessing(
    mean: Sequence[float],
    std: Sequence[float],
    *,
    size: Size | None = None,
    in_channels: int | None = None,
) -> Compose:
    """Deterministic evaluation pipeline: [grey to RGB] -> [resize] -> normalize.

    Args:
        mean, std: the dataset's statistics (one value per data channel; grey
            statistics also apply to the copies made by `in_channels=3`).
        size: resize images to this size, e.g. to fit a model trained on another size.
        in_channels: the model's input channels; 3 makes grey images RGB.
    """
    steps: list[Transform] = []
    if in_channels == 3:
        steps.append(GreyToRGB())
    elif in_channels not in (None, 1):
        raise UserError(f"in_channels must be 1, 3 or None, found {in_channels}.")
    if size is not None:
        steps.append(Resize(size))
    steps.append(Normalize(mean, std))
    return Compose(steps)


AUGMENTATIONS = ("none", "crop", "crop-flip")


def augmentation(name: str) -> Compose:
    """Training augmentation on [0, 1] images, applied before `preprocessing`.

    ``crop``: pad 4 and randomly crop back to the input size (use it for digits,
    where mirroring changes meaning); ``crop-flip``: crop plus horizontal flips;
    ``none``: identity.
    """
    if name == "none":
        return Compose([])
    if name == "crop":
        return Compose([RandomCrop(None, padding=4)])
    if name == "crop-flip":
        return Compose([RandomCrop(None, padding=4), RandomHorizontalFlip(0.5)])
    raise unknown_name("augmentation", name, AUGMENTATIONS)


def default_augmentation(dataset: str) -> str:
    """The default augmentation for a dataset name.

    None for the 28×28 grey sets: in the few epochs a CPU affords, random crops cost more than
    they give (LeNet-5, Fashion-MNIST, 4 epochs: 80.4% test with crops, 86.9% without).
    """
    if dataset in ("mnist", "fashion-mnist", "synthetic"):
        return "none"
    return "crop-flip"
