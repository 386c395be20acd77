"""The channel graph traced with torch.fx: operations it cannot follow raise, naming the node."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.assembly.assemble import assemble, side_by_side
from modellego.core.graph import trace
from modellego.errors import UnsupportedGraphError

from helpers import ChannelNorm


class ScalarGate(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(x.mean())
        return self.fc(x.mean((2, 3)))


class SpatialGate(nn.Module):
    """A (B, 1, H, W) map scales every channel: channel c of the product reads channel 0 of the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.att = nn.Conv2d(3, 1, 1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(self.att(x))  # (B, 3, H, W) * (B, 1, H, W)
        return self.fc(x.mean((2, 3)))


class SpatialGateExpanded(SpatialGate):
    """The same gate broadcast over the channels by `expand_as` before the product."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        x = x * torch.sigmoid(self.att(x)).expand_as(x)  # (B, 1, H, W) -> (B, 3, H, W)
        return self.fc(x.mean((2, 3)))


class ChannelUnsqueeze(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)).unsqueeze(1).flatten(1))  # (B, 3) -> (B, 1, 3)


class LogSoftmaxHead(nn.Module):
    """PyTorch's MNIST example ends with log_softmax, for NLLLoss."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(self.conv(x).mean((2, 3))), dim=1)


class Difference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(2, 3, 3)
        self.conv_b = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.conv_a(x) - self.conv_b(x)).mean((2, 3)))


class ChannelMean(nn.Module):
    """A mean over the channels of a (B, 3, 3, 3) map keeps the shape's first two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(9, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.mean(self.conv(x), 1).flatten(1))


class MatMul(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(torch.matmul(x, x).flatten(1))


class Recurrent(nn.Module):
    """Input (B, T, F) read as (B, C, L); an LSTM returns a tuple."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(4, 3, batch_first=True)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.fc(out[:, -1])


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self.conv(x)).mean((2, 3)))


class GroupedAfterCat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 2, 1), nn.Conv2d(2, 2, 1)
        self.conv = nn.Conv2d(4, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(torch.cat([self.a(x), self.b(x)], 1)).mean((2, 3)))


class CatSpatial(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.fc = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        return self.fc(torch.cat([x, x], 2).mean((2, 3)))


UNSUPPORTED = [
    (ScalarGate, (1, 2, 5, 5), "'mean'"),
    (SpatialGate, (1, 2, 5, 5), "'mul'"),
    (SpatialGateExpanded, (1, 2, 5, 5), "'expand_as'"),
    (ChannelUnsqueeze, (1, 2, 5, 5), "'unsqueeze'"),
    (Difference, (1, 2, 5, 5), "'sub'"),
    (LogSoftmaxHead, (1, 2, 5, 5), "return the logits instead"),
    (ChannelMean, (1, 2, 5, 5), "'mean'"),
    (MatMul, (1, 2, 4, 4), "'matmul'"),
    (Recurrent, (1, 3, 4), "'lstm'"),
    (SharedConv, (1, 2, 4, 4), "'conv_1'"),
    (GroupedAfterCat, (1, 2, 5, 5), "grouped convolution after a concatenation"),
    (CatSpatial, (1, 2, 3, 3), "'cat'"),
]


@pytest.mark.parametrize("cls,shape,node", UNSUPPORTED, ids=[u[0].__name__ for u in UNSUPPORTED])
def test_unsupported_ops_raise_naming_the_node(cls: type, shape: tuple, node: str) -> None:
    torch.manual_seed(0)
    with pytest.raises(UnsupportedGraphError) as info:
        trace(cls(), torch.randn(*shape))
    assert node in str(info.value)
    assert "cannot follow channels through node" in str(info.value)


def test_unsupported_op_raises_from_profile_too() -> None:
    model = SpatialGate()
    x, y = torch.randn(4, 2, 5, 5), torch.tensor([0, 1, 0, 1])
    with pytest.raises(UnsupportedGraphError, match="'mul'"):
        modellego.profile(model, [(x, y)], select=False)
    # and the failure left no hooks behind
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks


def test_untraceable_model_raises_unsupported_graph_error() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:  # data-dependent control flow
                x = -x
            return self.fc(x)

    with pytest.raises(UnsupportedGraphError, match="Branchy"):
        trace(Branchy(), torch.randn(1, 3))


# --- Forward passes as people write them: asserts, shape checks, norm-activation layers, drop-path ----------


class NormAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: asserts the input's rank, calls F.batch_norm on its own parameters."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        x = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return self.act(x)


class DropPath(nn.Module):
    """Stochastic depth: a no-op in eval mode, decided by Python attributes."""

    def __init__(self, p: float = 0.2) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        return x * (torch.rand(x.shape[0], 1, 1, 1) > self.p) / (1 - self.p)


class CheckedNet(nn.Module):
    """An MNIST CNN as found in the wild: a shape check, tuple-unpacked sizes, residual blocks with drop-path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 12, 3, padding=1, bias=False)
        self.norm = NormAct(12)
        self.conv = nn.Conv2d(12, 12, 3, padding=1, bias=False)
        self.norm2 = NormAct(12)
        self.drop = DropPath()
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (28, 28):
            raise ValueError(f"expects 28x28 images, got {tuple(x.shape[-2:])}")
        b, c, h, w = x.shape
        x = self.norm(self.stem(x))
        x = x + self.drop(self.norm2(self.conv(x)))
        return self.head(x.mean((2, 3)).reshape(b, -1))


def test_forward_passes_with_shape_checks_and_norm_act_layers_are_cut_exactly() -> None:
    torch.manual_seed(0)
    model = CheckedNet().double().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
    graph = trace(model, torch.randn(2, 1, 28, 28, dtype=torch.float64))
    assert set(graph.layers) == {"stem", "conv", "head"}
    assert all(n.target is not torch._assert for n in graph.gm.graph.nodes)  # checks the example passed
    x, y = torch.randn(30, 1, 28, 28, dtype=torch.float64), torch.arange(30) % 5
    prof = modellego.profile(model, [(x, y)], select=False)
    component = modellego.disassemble(model, [0, 2], profile=prof)  # verify=True: equals the masked source
    assert type(component.norm) is NormAct and isinstance(component.norm.act, nn.SiLU)
    assert component.stem.out_channels < 12
    assert component(x[:3]).shape == (3, 2)
    with pytest.raises(ValueError, match="expects 28x28"):  # the model's own check still runs
        component(torch.randn(1, 1, 32, 32, dtype=torch.float64))
    # And its components assemble, without a hand-built description: one network, exactly side by side.
    other = modellego.disassemble(model, [1, 3], profile=prof)
    assembly = assemble([component, other], mode="padded")
    with torch.no_grad():
        got, want = assembly(x[:4]), side_by_side([component, other], x[:4])
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()


def test_branches_on_tensor_values_stay_refused() -> None:
    class OnValues(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for _row in x:  # iterating over data
                pass
            return self.fc(x)

    with pytest.raises(UnsupportedGraphError, match="OnValues"):
        trace(OnValues(), torch.randn(2, 3))


def stochastic_depth(x: torch.Tensor, p: float, mode: str, training: bool = True) -> torch.Tensor:
    """Stands in for torchvision.ops.stochastic_depth (the same signature, registered the same way)."""
    if not training or p == 0.0:
        return x
    return x * (torch.rand(x.shape[0], 1, 1, 1) > p)


stochastic_depth.__module__ = "torchvision.ops.stochastic_depth"
torch.fx.wrap("stochastic_depth")


class TorchvisionBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.fc = nn.Linear(2 * 16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + stochastic_depth(self.conv(x), 0.2, "row", self.training)
        return self.fc(torch.flatten(x, 1))


def test_stochastic_depth_in_eval_mode_passes_channels_through() -> None:
    graph = trace(TorchvisionBlock().eval(), torch.randn(1, 2, 4, 4))
    node = next(n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is stochastic_depth)
    assert graph.roles[node] == "pass"


class _Scaled(nn.Module):
    def __init__(self, norm: nn.Module, scale: torch.Tensor) -> None:
        super().__init__()
        self.conv, self.norm, self.fc = nn.Conv2d(2, 4, 3, padding=1), norm, nn.Linear(4, 2)
        self.scale = nn.Parameter(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc((self.norm(self.conv(x)) * self.scale).mean((2, 3)))


class _Odd(nn.LayerNorm):
    """A LayerNorm subclass that does something else: neither reading can be assumed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) * 2


@pytest.mark.parametrize("norm,scale,pinned", [
    (ChannelNorm(4), torch.ones(1), True), (nn.GroupNorm(2, 4), torch.ones(1), True),
    (nn.LayerNorm([5, 5]), torch.ones(1), False), (nn.Identity(), torch.ones(1), False),
    (nn.Identity(), torch.ones(4, 1, 1), True)])
def test_norms_over_channels_and_per_channel_constants_pin_their_space(norm: nn.Module, scale: torch.Tensor,
                                                                       pinned: bool) -> None:
    graph = trace(_Scaled(norm, scale), torch.randn(1, 2, 5, 5))
    space = graph.find(graph.segments(graph.layers["conv"].node)[0].space)
    assert (space in graph.whole_spaces) is pinned


def test_a_norm_or_constant_that_cannot_be_read_is_refused_by_name() -> None:
    with pytest.raises(UnsupportedGraphError, match="cannot tell which axes the _Odd normalises"):
        trace(_Scaled(_Odd(4), torch.ones(1)), torch.randn(1, 2, 5, 5))

    class Matmul(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.w = nn.Conv2d(2, 4, 1), nn.Parameter(torch.randn(4, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x).mean((2, 3)) @ self.w

    with pytest.raises(UnsupportedGraphError, match="read from an attribute"):
        trace(Matmul(), torch.randn(1, 2, 5, 5))
