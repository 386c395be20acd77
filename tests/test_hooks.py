"""Hooks are always removed and training flags restored, even when a forward pass raises."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.fx
import torch.nn as nn

import modellego
from modellego import hooks
from modellego.calibration.calibrate import calibrate, recompute_batchnorm
from modellego.core.graph import trace
from modellego.core.locate import keep_channels
from modellego.cut.disassemble import masked_forward
from modellego.evaluation.metrics import accuracy, count_flops, measure_latency
from modellego.hooks import forward_hooks

from helpers import described_model


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


class Boom(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def exploding() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), Boom())


@pytest.mark.parametrize("pre", [False, True])
@pytest.mark.parametrize("eval_mode", [True, False])
def test_hooks_removed_and_training_restored_when_forward_raises(pre: bool, eval_mode: bool) -> None:
    model = exploding().train()
    model[1].eval()  # a deliberately frozen BatchNorm inside a model in training mode
    before = flags(model)
    calls: list[str] = []
    record = {name: (lambda name: lambda *args: calls.append(name))(name) for name in ("0", "1", "2")}  # noqa: B023 (bound by the outer lambda)
    with pytest.raises(RuntimeError, match="boom"):
        with forward_hooks(model, record, pre=pre, eval_mode=eval_mode):
            assert not model[0].training if eval_mode else model[0].training
            model(torch.randn(2, 1, 5, 5))
    assert calls == ["0", "1", "2"]  # the hooks were live during the pass
    assert no_hooks_left(model)
    assert flags(model) == before  # every module's own flag, not just model.training


def test_hooks_removed_when_the_block_body_raises() -> None:
    model = exploding().eval()
    with pytest.raises(KeyError):
        with forward_hooks(model, {"0": lambda *a: None, "1": lambda *a: None}):
            assert model[0]._forward_hooks and model[1]._forward_hooks
            raise KeyError("body")
    assert no_hooks_left(model) and not model.training


def test_unknown_layer_registers_nothing() -> None:
    model = exploding()
    with pytest.raises(KeyError, match="nope"):
        with forward_hooks(model, {"0": lambda *a: None, "nope": lambda *a: None}):
            pass  # pragma: no cover
    assert no_hooks_left(model) and model.training


class ArmedReLU(nn.ReLU):
    """A ReLU (so the graph accepts it) that fails once armed, i.e. in the middle of profiling."""

    armed = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.armed and not isinstance(x, torch.fx.Proxy):  # fx inlines F.relu when tracing
            raise RuntimeError("forward failed partway")
        return super().forward(x)


def flaky_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), ArmedReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )


@pytest.mark.parametrize("select", [False, True])
def test_profile_whose_forward_raises_leaves_no_hooks(select: bool) -> None:
    model = flaky_model().train()
    model[1].eval()
    before = flags(model)
    model[4].armed = True  # tracing inlines F.relu; the eager passes fail
    x, y = torch.randn(6, 1, 7, 7), torch.tensor([0, 1] * 3)
    with pytest.raises(RuntimeError, match="partway"):
        modellego.profile(model, [(x, y)], select=select)
    assert no_hooks_left(model)
    assert flags(model) == before


def test_profile_succeeds_without_the_fault_and_leaves_no_hooks() -> None:
    model = flaky_model().train()
    before = flags(model)
    prof = modellego.profile(model, [(torch.randn(6, 1, 7, 7), torch.tensor([0, 1] * 3))], select=False)
    assert prof.layers == ["0", "3", "7"]
    assert no_hooks_left(model) and flags(model) == before


def test_masked_forward_leaves_no_hooks_when_forward_raises() -> None:
    model = flaky_model().train()
    graph = trace(model, torch.randn(1, 1, 7, 7))
    assert model.training  # tracing restored it
    keep = keep_channels(graph, {k: torch.ones(ly.in_features, dtype=torch.bool) for k, ly in graph.layers.items()}, [0, 1])
    model[4].armed = True
    with pytest.raises(RuntimeError, match="partway"):
        masked_forward(model, graph, keep, torch.randn(3, 1, 7, 7))
    assert no_hooks_left(model) and model.training


def frozen_bn_model() -> nn.Module:
    """A described zoo model in training mode whose first BatchNorm is deliberately frozen (eval)."""
    model = described_model("vgg11_bn", 0.125, 0, num_classes=4, size=(32, 32)).train()
    next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d)).eval()
    return model


def _batches(n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 32, 32, generator=g), torch.arange(n) % 4)]


@pytest.mark.parametrize("run", [
    lambda m: accuracy(m, _batches()),
    lambda m: count_flops(m, (1, 32, 32)),
    lambda m: measure_latency(m, (1, 32, 32), repeats=1, warmup=0),
    lambda m: recompute_batchnorm(m, [x for x, _ in _batches()]),
    lambda m: calibrate(m, copy.deepcopy(m), [0, 1, 2, 3], _batches(), method="bn+affine"),
], ids=["accuracy", "count_flops", "measure_latency", "recompute_batchnorm", "calibrate"])
def test_passes_over_a_model_restore_every_modules_own_training_flag(run) -> None:
    model = frozen_bn_model()
    before = flags(model)
    assert not all(before.values()) and any(before.values())  # the frozen BatchNorm is the only module in eval
    run(model)
    assert flags(model) == before


def test_scale_assembly_restores_every_modules_own_training_flag() -> None:
    parts = [described_model("lenet5", 0.25, s, num_classes=3, dataset=d) for s, d in ((0, "a"), (1, "b"))]
    asm = modellego.assemble(parts, mode="parallel").train()
    next(m for m in asm.modules() if isinstance(m, nn.Conv2d)).eval()  # one module frozen inside a training model
    before = flags(asm)
    g = torch.Generator().manual_seed(2)
    modellego.scale_assembly(asm, [(torch.rand(12, 1, 28, 28, generator=g), torch.arange(12) % 6)], "calibrated")
    assert flags(asm) == before


def test_eval_mode_restores_flags_when_the_block_raises() -> None:
    model = frozen_bn_model()
    before = flags(model)
    with pytest.raises(RuntimeError, match="inside"):
        with hooks.eval_mode(model):
            assert not any(m.training for m in model.modules())
            raise RuntimeError("inside")
    assert flags(model) == before
