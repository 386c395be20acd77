"""The channel graph traced with torch.fx: operations it cannot follow raise, naming the node."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego
from modellego.core.graph import trace
from modellego.errors import UnsupportedGraphError


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


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, groups=2)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


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
    (Grouped, (1, 2, 5, 5), "groups=2"),
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
