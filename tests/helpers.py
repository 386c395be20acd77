"""Helpers shared by the tests."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors
import torch
import torch.nn as nn
from safetensors.torch import save_file

import modellego
from modellego.assembly.assemble import Assembly, assemble
from modellego.calibration.calibrate import last_layer
from modellego.core.contribution import LayerAccumulator
from modellego.core.graph import trace
from modellego.cut.prune import full_plan
from modellego.data.union import union_dataset
from modellego.evaluation.protocol import scaling_batches
from modellego.io.checkpoint import HEADER_HASH, header_hash
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


# --- Three-channel 28x28 models of five classes: files and profiles (file_*), disassembly (zoo_*) ------


SHAPE = (3, 28, 28)
NUM_CLASSES = 5
TINY_WIDTH = {"lenet5": 0.25, "alexnet": 0.125, "mobilenet_v2": 0.125, "mobilenet_v3_small": 0.125}


def file_model(name: str, seed: int = 0, num_classes: int = 5) -> nn.Module:
    torch.manual_seed(seed)
    model = modellego.create_model(name, num_classes=num_classes, in_channels=3, width=TINY_WIDTH.get(name, 0.0625))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-default buffers and affine parameters, so they must round-trip too
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.num_batches_tracked.fill_(7)
    return model.eval()


def assert_same_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        assert torch.equal(a.eval()(x), b.eval()(x))


def file_data(n: int = 15) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, *SHAPE, generator=g), torch.arange(n) % 5)]


def no_files_but(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def rewrite_header(path: Path, edit, *, key: str = "modellego", rehash: bool = True) -> None:
    """Re-save `path` with the same tensors and an edited header under `key` (weights hash still valid).

    With `rehash`, a header that carries a ``header_sha256`` gets the one of its edited fields, so
    that the edit itself is what a reader meets; without, the edit is a tampered header.
    """
    with safetensors.safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = json.loads(f.metadata()[key])
    edit(header)
    if rehash and isinstance(header, dict) and HEADER_HASH in header:
        header[HEADER_HASH] = header_hash(header)
    save_file(tensors, str(path), metadata={key: json.dumps(header)})


def zoo_model(name: str, width: float, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = modellego.create_model(name, num_classes=NUM_CLASSES, in_channels=3, width=width)
    return randomise_bn(model, seed).eval()


def zoo_data(n: int = 20, seed: int = 1, num_classes: int = NUM_CLASSES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.arange(n) % num_classes


def profiled_with_contributions(name: str, width: float, seed: int = 0):
    """A grey 28x28 zoo model of five classes, 40 images and their profile with contributions (test_budget, conftest)."""
    model = described_model(name, width, seed=seed, num_classes=5, dataset="d")
    g = torch.Generator().manual_seed(seed + 1)
    x, y = torch.randn(40, 1, 28, 28, generator=g), torch.arange(40) % 5
    return model, x, modellego.profile(model, [(x, y)], select=False, keep_contributions=True)


# --- Small networks built by hand ------------------------------------------------------------------


def tiny_sequential() -> nn.Sequential:
    g = torch.Generator().manual_seed(7)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 3),
    ).double()
    with torch.no_grad():
        for m in (model[0], model[2], model[6]):
            m.weight.copy_(torch.randn(m.weight.shape, generator=g, dtype=torch.float64))
            m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g, dtype=torch.float64))
    return model.eval()


def _depthwise_net() -> nn.Module:
    """Conv, BatchNorm, depthwise conv, 1×1 conv, pooling, Linear: the MobileNet pattern, small."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6, bias=False), nn.ReLU(),
        nn.Conv2d(6, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 5),
    ).eval()


class GroupedNet(nn.Module):
    """A ResNeXt bottleneck: 1×1, grouped 3×3 (4 groups), 1×1, residual add, then a Linear head."""

    def __init__(self, num_classes: int = 5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.reduce = nn.Sequential(nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.grouped = nn.Sequential(nn.Conv2d(16, 12, 3, stride=2, padding=1, groups=4, bias=False),
                                     nn.BatchNorm2d(12), nn.ReLU())
        self.expand = nn.Conv2d(12, 8, 1)
        self.down = nn.Conv2d(8, 8, 1, stride=2)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = torch.relu(self.expand(self.grouped(self.reduce(h))) + self.down(h))
        return self.fc(h.mean((2, 3)))


class CrossStage(nn.Module):
    """CSPNet: split the channels, a conv on one half, concatenate (channel counts fixed in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.mix, self.fc = nn.Conv2d(8, 8, 1), nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.stem(x)).split(4, dim=1)
        return self.fc(torch.relu(self.mix(torch.cat([a, torch.relu(self.conv(b))], 1))).mean((2, 3)))


class PartialResidual(nn.Module):
    """ReXNet: the shortcut is added to the first channels only, ``x[:, :n] + shortcut``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.grow, self.fc = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 9, 3, padding=1), nn.Linear(9, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        y = self.grow(h)
        y = torch.cat([y[:, :6] + h, y[:, 6:]], dim=1)
        return self.fc(torch.relu(y).mean((2, 3)))


class Ghost(nn.Module):
    """GhostNet: a depthwise "cheap" copy concatenated to its input, cut to an odd width by a slice."""

    def __init__(self) -> None:
        super().__init__()
        self.primary, self.cheap = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.short, self.fc = nn.Conv2d(3, 7, 1), nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.relu(self.primary(x))
        g = torch.cat([p, self.cheap(p)], 1)[:, :7]
        return self.fc(torch.relu(g + self.short(x)).mean((2, 3)))


class Shuffle(nn.Module):
    """ShuffleNetV2: chunk, a branch, concatenate, shuffle the channels across the two groups."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.branch = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
        self.head, self.fc = nn.Conv2d(8, 6, 1), nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.relu(self.stem(x)).chunk(2, dim=1)
        y = torch.cat([a, torch.relu(self.branch(b))], 1)
        n, c, h, w = y.size()
        y = torch.transpose(y.view(n, 2, c // 2, h, w), 1, 2).contiguous().view(n, c, h, w)
        return self.fc(torch.relu(self.head(y)).mean((2, 3)))


class ChannelNorm(nn.LayerNorm):
    """timm's LayerNorm2d: a LayerNorm over the channels of (B, C, H, W), permuting inside."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    """A ConvNeXt block with conv_mlp: depthwise 7×7, channel LayerNorm, 1×1 MLP, layer scale, residual;
    `norm` picks the block's norm ("layer", "group" or "spatial": a LayerNorm over (H, W) only)."""

    def __init__(self, norm: str = "layer", size: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(6, 6, 7, padding=3, groups=6)
        self.norm = {"layer": lambda: ChannelNorm(6), "group": lambda: nn.GroupNorm(2, 6),
                     "spatial": lambda: nn.LayerNorm([size, size])}[norm]()
        self.fc1, self.fc2 = nn.Conv2d(6, 12, 1), nn.Conv2d(12, 6, 1)
        self.gamma = nn.Parameter(torch.linspace(0.5, 1.5, 6))
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        y = self.fc2(nn.functional.gelu(self.fc1(self.norm(self.dw(h)))))
        h = h + y.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.head(h.mean((2, 3)))


def _perturbed_pair() -> tuple[nn.Module, nn.Module, dict, list[torch.Tensor]]:
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(),
                           nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)).eval()
    broken = copy.deepcopy(source)
    with torch.no_grad():
        for p in broken.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape))
    images = list(torch.randn(16, 1, 12, 12).split(8))
    return source, broken, full_plan(trace(source, images[0][:1])), images


# --- Layers and inputs for the contribution accumulators (test_contribution, test_kernels, test_cuda) --


def make_conv(kwargs: dict, *, in_channels: int = 4, seed: int = 0) -> nn.Conv2d:
    kwargs = dict(kwargs)
    out = kwargs.pop("out_channels", 6)
    k = kwargs.pop("kernel_size", 3)
    torch.manual_seed(seed)
    m = nn.Conv2d(in_channels, out, k, **kwargs).double()
    with torch.no_grad():
        m.bias.uniform_(-1, 1)  # bias must not leak into s
    return m


def _feed(acc: LayerAccumulator, x: torch.Tensor, slots: torch.Tensor, splits: list[int]) -> None:
    start = 0
    for n in splits:
        acc.update(x[start: start + n], slots[start: start + n])
        start += n
    assert start == len(x)


ACC_LAYERS = {
    "conv": lambda: make_conv({"padding": 1, "stride": 2}),
    "conv_reflect": lambda: make_conv({"padding": 1, "padding_mode": "reflect"}),
    "grouped": lambda: make_conv({"groups": 2, "out_channels": 8}),
    "depthwise": lambda: make_conv({"groups": 4, "out_channels": 4, "padding": 1}),
    "linear": lambda: nn.Linear(4, 6).double(),
    "conv_tiny_map": lambda: make_conv({"padding": 1}),  # 2×3 inputs: the pixel form (J = 6 < K = 9)
    "conv_one_pixel": lambda: make_conv({"padding": 1}),  # 1×1 inputs: ReLU(u·w) splits by sign
    "pointwise": lambda: make_conv({"kernel_size": 1, "out_channels": 6}),
    "pointwise_strided_grouped": lambda: make_conv({"kernel_size": 1, "stride": 2, "groups": 2, "out_channels": 6}),
}


def _inputs(kind: str, n: int) -> torch.Tensor:
    torch.manual_seed(2)
    if kind == "linear":
        return torch.randn(n, 4, dtype=torch.float64)
    size = {"conv_tiny_map": (2, 3), "conv_one_pixel": (1, 1)}.get(kind, (7, 6))
    return torch.randn(n, 4, *size, dtype=torch.float64)


# --- Assemblies of the trained components of conftest's `trained` (scaling, density, fine-tuning) -----


def _assembly(comps, inflate: float = 1.0) -> Assembly:
    comps = [copy.deepcopy(c) for c in comps]
    if inflate != 1.0:
        fc = last_layer(comps[1], 3)
        with torch.no_grad():
            fc.weight.mul_(inflate)
            fc.bias.mul_(inflate)
    return assemble(comps)


def _fit_images(asm: Assembly, ds, per_class: int = 60):
    union = union_dataset(asm, {"synthetic": ds})
    return union, scaling_batches(asm, union, per_class=per_class)


def torchrun(*argv: str) -> subprocess.CompletedProcess:
    """`modellego ARGV` launched by torchrun as two CPU processes (gloo on the loopback device)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "modellego.cli", *argv], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1  # every process holds the profile; the first writes
    return proc
