"""Pruning keeps each layer's own class and attributes, and the built-in check refuses any component
that differs from the masked source, however small the logits."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.core.layers import LAYER_TYPES, LayerType
from modellego.cut import disassemble as disassemble_module
from modellego.cut.disassemble import relative_error
from modellego.cut.prune import fresh_like, prune_layers
from modellego.errors import UnsupportedGraphError, UserError

from helpers import zoo_data, zoo_model


class NormAct(nn.BatchNorm2d):
    """A BatchNorm with its activation inside, as timm's norm-act layers are built."""

    def __init__(self, n: int) -> None:
        super().__init__(n, eps=1e-3, momentum=0.05)
        self.act = nn.SiLU()
        self.drop_rate = 0.25

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(super().forward(x))


class WideConv(nn.Conv2d):
    tag = "class attribute"


def test_pruned_layers_keep_their_class_and_attributes() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(WideConv(3, 6, 3, padding=1), NormAct(6), nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    keep = [0, 2, 5]
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        want = model[1](model[0](x))[:, keep]
    pruned = prune_layers(nn.Sequential(*[m for m in model]), {"0": {"out": keep}, "1": {"out": keep}, "2": {"in": keep}})
    conv, norm = pruned[0], pruned[1]
    assert type(conv) is WideConv and conv.out_channels == 3 and conv.padding == (1, 1)
    assert type(norm) is NormAct and isinstance(norm.act, nn.SiLU) and norm.drop_rate == 0.25
    assert (norm.num_features, norm.eps, norm.momentum) == (3, 1e-3, 0.05)
    with torch.no_grad():
        torch.testing.assert_close(norm(conv(x)), want, rtol=0, atol=1e-6)
    # The source keeps its own tensors and sizes.
    assert model[0].out_channels == 6 and model[1].running_mean.shape == (6,) and model[2].in_channels == 6
    assert norm.act is not model[1].act and norm._parameters is not model[1]._parameters


def test_relative_error_is_scale_free() -> None:
    want = torch.tensor([[1e-6, -2e-6]])
    assert relative_error(want * (1 + 1e-7), want) < 1e-6
    assert relative_error(want * 2, want) == pytest.approx(1.0)
    assert relative_error(want[:, :1], want) == float("inf")
    assert relative_error(torch.zeros(1, 2), torch.zeros(1, 2)) == 0.0


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_a_component_with_a_swapped_activation_is_refused(monkeypatch, scale: float) -> None:
    """A mutant that computes something else (SiLU for ReLU) must fail the check, also with logits so small
    that an absolute tolerance (allclose's atol=1e-4) would have let it through."""
    model = zoo_model("vgg11_bn", 0.0625)
    with torch.no_grad():
        last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        last.weight.mul_(scale)
        last.bias.mul_(scale)
    x, y = zoo_data(10)
    prof = modellego.profile(model, [(x, y)], select=False)
    modellego.disassemble(model, [0, 1], profile=prof)  # the true component passes

    def mutated(m: nn.Module, plan):
        out = prune_layers(m, plan)
        name = next(n for n, sub in out.named_modules() if isinstance(sub, nn.ReLU))
        out.set_submodule(name, nn.SiLU())
        return out

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def recording(got: torch.Tensor, want: torch.Tensor) -> float:
        seen.append((got, want))
        return relative_error(got, want)

    monkeypatch.setattr(disassemble_module, "prune_layers", mutated)
    monkeypatch.setattr(disassemble_module, "relative_error", recording)
    with pytest.raises(UnsupportedGraphError, match="does not reproduce the masked source"):
        modellego.disassemble(model, [0, 1], profile=prof)
    (got, want), = seen
    assert not torch.equal(got, want)
    if scale < 1:
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-4)  # what the old check accepted


def test_a_grouped_convolution_is_cut_group_by_group() -> None:
    """Each kept group keeps its own inputs: the cut equals the source's outputs on those channels
    with the dropped inputs zeroed, and unequal groups are refused by name."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()  # groups: inputs 0-3 -> outputs 0-2, 4-7 -> 3-5
    x = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    keep_in, keep_out = [1, 3, 4, 6], [0, 2, 4, 5]
    zeroed = x.clone()
    zeroed[:, [c for c in range(8) if c not in keep_in]] = 0
    pruned = prune_layers(nn.Sequential(conv), {"0": {"in": keep_in, "out": keep_out}})[0]
    assert (pruned.groups, pruned.in_channels, pruned.out_channels) == (2, 4, 4)
    with torch.no_grad():
        got, want = pruned(x[:, keep_in]), conv(zeroed)[:, keep_out]
    assert (got - want).abs().max() <= 1e-12 * want.abs().max()
    # A group dropped whole: one group left, a plain convolution.
    single = prune_layers(nn.Sequential(conv), {"0": {"in": [4, 7], "out": [3]}})[0]
    assert (single.groups, single.in_channels, single.out_channels) == (1, 2, 1)
    with pytest.raises(UserError, match="same number of inputs"):
        prune_layers(nn.Sequential(conv), {"0": {"in": [1, 4, 6], "out": [0, 4]}})
    with pytest.raises(UserError, match="same groups"):
        prune_layers(nn.Sequential(conv), {"0": {"in": [1, 2], "out": [4, 5]}})


def test_resizing_keeps_the_class_and_attributes_too() -> None:
    norm = fresh_like(NormAct(6), 4)
    assert type(norm) is NormAct and isinstance(norm.act, nn.SiLU) and (norm.num_features, norm.eps) == (4, 1e-3)
    assert not norm.weight.any() and norm.running_var.tolist() == [1.0] * 4
    conv = fresh_like(WideConv(3, 6, 3, padding=1), 5, 2)
    assert type(conv) is WideConv and conv.weight.shape == (5, 2, 3, 3) and conv.padding == (1, 1)
    assert not conv.weight.any()


class ChannelScale(nn.Module):
    """A layer the library does not know: one learned scale per channel."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(0.5, 2.0, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight[:, None, None]


def test_a_new_layer_type_is_one_entry_of_the_table(monkeypatch) -> None:
    def cut(m: ChannelScale, idx: torch.Tensor, in_idx, name: str) -> nn.Module:
        new = ChannelScale(len(idx))
        new.weight.data = m.weight.detach()[idx].clone()
        return new

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), ChannelScale(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).double().eval()
    x = torch.randn(16, 3, 6, 6, dtype=torch.float64)
    # Unknown, it is traced into: a per-channel constant, so the cut keeps its channels whole.
    prof = modellego.profile(model, [(x, torch.arange(16) % 4)], select=False)
    assert modellego.disassemble(model, [0, 1], profile=prof)[0].out_channels == 8
    entry = LayerType("channelwise", lambda m: (len(m.weight), None), cut, lambda m, n, _: ChannelScale(n))
    monkeypatch.setitem(LAYER_TYPES, ChannelScale, entry)
    prof = modellego.profile(model, [(x, torch.arange(16) % 4)], select=False)
    component = modellego.disassemble(model, [0, 1], profile=prof)  # checked against the masked source
    kept = component[0].out_channels
    assert kept < 8 and type(component[1]) is ChannelScale and component[1].weight.shape == (kept,)
