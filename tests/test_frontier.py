"""Recon's frontier and checkpoints: where the cuts are, which are written, what is saved comes back equal,
in its layout, aligned as PyTorch allocates; and both give the weights of passes per layer."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import modellego.calibration.frontier as frontier
import modellego.calibration.reconstruct as recon_module
from modellego.calibration.frontier import INPUT, Checkpoints, TracedGraph
from modellego.calibration.reconstruct import execution_order, reconstruct, residual_joins
from modellego.core.graph import trace
from modellego.cut.prune import full_plan

from helpers import _depthwise_net, described_model

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


@pytest.mark.parametrize("shape,channels_last", [((3, 7), False), ((5, 3, 4, 4), False), ((2, 6, 5, 3), True),
                                                 ((1,), False)])
def test_a_checkpoint_comes_back_equal_in_layout_and_aligned(tmp_path, shape, channels_last: bool) -> None:
    inputs = [torch.zeros(2, 3), torch.zeros(2, 3)]
    cuts = Checkpoints(tmp_path / "cuts", inputs, wanted=[7])
    value = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        value = value.contiguous(memory_format=torch.channels_last)
    for batch in (0, 1):
        cuts.save(7, batch, value + batch)
    assert cuts.best(6) == INPUT and cuts.best(7) == 7 and cuts.load(INPUT, 1) is inputs[1]
    back = cuts.load(7, 1)
    assert torch.equal(back, value + 1) and back.stride() == value.stride()
    # A tensor read where the file put it may sit at any offset; a CPU matmul on unaligned data can
    # round differently from the run that saved it.
    assert back.data_ptr() % 64 == 0


def test_a_cut_that_not_every_batch_saved_is_not_used_and_old_cuts_are_deleted(tmp_path) -> None:
    cuts = Checkpoints(tmp_path / "cuts", [torch.zeros(1), torch.zeros(1)], wanted=[3, 5, 9, 11])
    cuts.save(3, 0, torch.ones(2))
    assert cuts.best(10) == INPUT  # batch 1 has not passed node 3
    cuts.save(3, 1, torch.ones(2))
    for batch in (0, 1):
        cuts.save(5, batch, torch.ones(2))
        cuts.save(9, batch, torch.full((2,), float(batch)))
    assert cuts.best(8) == 5 and cuts.best(10) == 9
    cuts.forget_before(8)  # every later layer resumes at node 5 or after
    assert sorted(p.name for p in (tmp_path / "cuts").iterdir()) == ["5-0.safetensors", "5-1.safetensors",
                                                                    "9-0.safetensors", "9-1.safetensors"]
    assert cuts.best(4) == INPUT
    # A layout other than contiguous or channels-last is not saved: resuming could not reproduce it.
    cuts.save(11, 0, torch.ones(4, 4).T)
    assert 11 not in cuts.saved


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.conv, self.fc = torch.nn.Conv2d(1, 2, 1), torch.nn.Conv2d(2, 2, 1), torch.nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        h = h + torch.relu(self.conv(h))  # h stays live beside the branch until the add
        return self.fc(h.mean((2, 3)))


def test_the_cuts_are_where_one_value_alone_is_live_and_only_wanted_ones_are_written(tmp_path) -> None:
    graph = TracedGraph(torch.fx.symbolic_trace(_Block()))
    names = [n.name for n in graph.nodes]
    assert names == ["x", "stem", "conv", "relu", "add", "mean", "fc", "output"]
    # Not the input (that is INPUT), nor inside the residual branch, where `stem` is still live.
    assert [names[i] for i in graph.cuts] == ["stem", "add", "mean", "fc", "output"]
    assert graph.last_cut(0) == INPUT and graph.last_cut(3) == 1 and graph.last_cut(4) == 4
    cuts = Checkpoints(tmp_path / "cuts", [torch.zeros(1)], wanted=[4])
    cuts.save(1, 0, torch.ones(2))
    cuts.save(4, 0, torch.ones(2))
    assert cuts.saved == {4: {0}} and [p.name for p in (tmp_path / "cuts").iterdir()] == ["4-0.safetensors"]


class _ShortcutFirst(nn.Module):
    """A residual add without BatchNorm whose shortcut projection runs first: its output is both a
    layer's target and the other operand of the branch's add (read twice from the frontier)."""

    def __init__(self, in_place: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.short, self.conv = nn.Conv2d(1, 4, 1), nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 7 * 7, 3)
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.short(x)
        if self.in_place:  # the add then reads the shortcut as changed after it was computed
            s.relu_()
        return self.fc(torch.flatten(F.max_pool2d(torch.relu(self.conv(x) + s), 4), 1))


# Budgets in bytes that the frontier outgrows after a few layers, not at the first (measured).
HALF_WAY = {"resnet18": 400_000, "googlenet": 2_500_000, "mobilenet_v2": 500_000, "mobilenet_v3_small": 500_000,
            "depthwise": 540_000, "shortcut_first": 800_000, "shortcut_in_place": 800_000, "inplace": 400_000}


@pytest.mark.parametrize("name", list(HALF_WAY))
def test_frontier_and_checkpoints_equal_passes_per_layer(name: str, caplog: pytest.LogCaptureFixture) -> None:
    """Holding the batches' values between layers, and resuming each batch from checkpoints, give the
    very weights that re-running the models for every layer does; also when the values outgrow the
    budget half way and the rest resume from checkpoints."""
    if name == "depthwise":
        source = _depthwise_net()
    elif name == "inplace":  # in-place ReLUs overwrite each convolution's output after it ran
        torch.manual_seed(0)
        source = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.Conv2d(4, 6, 3), nn.ReLU(inplace=True),
                               nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 5)).eval()
    elif name.startswith("shortcut"):
        source = _ShortcutFirst(in_place=name == "shortcut_in_place").eval()
        joins = residual_joins(torch.fx.symbolic_trace(source))
        assert set(joins) == ({"conv"} if name == "shortcut_in_place" else {"short", "conv"})
        assert joins["conv"].other == "short"  # read by the add after `relu_` changed it
    else:
        source = described_model(name, 0.125 if name.startswith("mobilenet") else 0.0625, seed=0, num_classes=5)
    g = torch.Generator().manual_seed(9)
    images = list(torch.randn(24, 1, 28, 28, generator=g).split(8))
    x = torch.randn(4, 1, 28, 28, generator=g)
    # The channel tracer refuses `relu_` on a value used again; its twin without it has the same channels.
    plan = full_plan(trace(_ShortcutFirst() if name == "shortcut_in_place" else source, x[:1]))
    broken = copy.deepcopy(source)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.3 * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    results, starts, roots = {}, [], []
    load, init = frontier.Checkpoints.load, frontier.Checkpoints.__init__

    def recording_load(self, index: int, batch: int) -> torch.Tensor:
        starts.append(index)
        return load(self, index, batch)

    def recording_init(self, root, inputs, wanted) -> None:
        roots.append(root)
        init(self, root, inputs, wanted)

    for setting in ("passes", "checkpoints", "frontier", "half way"):
        model = copy.deepcopy(broken)
        with caplog.at_level("INFO", logger="modellego"), pytest.MonkeyPatch.context() as mp:
            caplog.clear()
            mp.setattr(frontier.Checkpoints, "load", recording_load)
            mp.setattr(frontier.Checkpoints, "__init__", recording_init)
            if setting == "passes":  # no layer for the frontier or the checkpoints
                mp.setattr(recon_module, "servable_layers", lambda *args: [])
            budget = {"passes": 0, "checkpoints": 0, "frontier": 1 << 40, "half way": HALF_WAY[name]}[setting]
            r2 = reconstruct(model, source, plan, images, memory_budget=budget)
        results[setting] = (r2, model.state_dict(), [r.message for r in caplog.records if "outgrow" in r.message])
        assert all(not root.exists() for root in roots), setting  # the checkpoints are gone
        if setting in ("passes", "frontier"):
            assert not starts, setting
        else:  # one batch at a time, resuming from saved cuts once past the first layers
            assert len(starts) % len(images) == 0, setting
            # Both of _ShortcutFirst's layers read the input: no value before them stands alone.
            assert (max(starts) > frontier.INPUT) == (not name.startswith("shortcut")), setting
        starts.clear()
    (r2_0, state_0, _), *rest = results.values()
    for setting, (r2, state, _) in zip(list(results)[1:], rest):
        assert r2 == r2_0, setting
        for k in state_0:
            assert torch.equal(state_0[k], state[k]), (setting, k)
    log_all, log_half = results["frontier"][2], results["half way"][2]
    assert not log_all and len(log_half) == 1
    order = execution_order(source, x)
    assert order.index(log_half[0].split(" at ")[1].split(";")[0]) > 0, log_half  # past the first layer


@pytest.mark.parametrize("name", ["vgg11_bn", "resnet18", "googlenet"])
def test_checkpoints_write_only_the_cuts_that_runs_resume_from(name: str) -> None:
    """Every checkpoint written is read back, and the runs resume exactly where they would if
    every cut they pass were written: same starts, same weights, fewer files."""
    source = described_model(name, 0.0625, seed=0, num_classes=5).eval()
    g = torch.Generator().manual_seed(5)
    images = list(torch.randn(8, 1, 28, 28, generator=g).split(4))
    plan = full_plan(trace(source, images[0][:1]))
    broken = copy.deepcopy(source)
    with torch.no_grad():
        for m in broken.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.add_(0.3 * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    load, init, save = frontier.Checkpoints.load, frontier.Checkpoints.__init__, frontier.save_file
    runs = {}
    for setting in ("wanted", "every cut"):
        loads, writes = [], []

        def recording_init(self, root, inputs, wanted) -> None:
            init(self, root, inputs, range(1, 10_000) if setting == "every cut" else wanted)  # noqa: B023 (0: the input)

        def recording_load(self, index: int, batch: int) -> torch.Tensor:
            if index != frontier.INPUT:
                loads.append((self.root.name, index, batch))  # noqa: B023
            return load(self, index, batch)

        def recording_save(tensors, path, metadata) -> None:
            index, batch = map(int, Path(path).stem.split("-"))
            writes.append((Path(path).parent.name, index, batch))  # noqa: B023
            save(tensors, path, metadata=metadata)

        model = copy.deepcopy(broken)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(frontier.Checkpoints, "__init__", recording_init)
            mp.setattr(frontier.Checkpoints, "load", recording_load)
            mp.setattr(frontier, "save_file", recording_save)
            reconstruct(model, source, plan, images, memory_budget=0)
        runs[setting] = loads, writes, model.state_dict()
    (loads, writes, state), (loads_all, writes_all, state_all) = runs["wanted"], runs["every cut"]
    assert loads and loads == loads_all
    assert sorted(writes) == sorted(set(loads)) and len(writes) < len(writes_all), (len(writes), len(writes_all))
    for k in state:
        assert torch.equal(state[k], state_all[k]), k


def test_checkpoints_keep_a_channels_last_layout_and_go_when_recon_fails() -> None:
    """A channels-last batch resumes as channels-last (same numbers as holding it); a failure half
    way leaves no checkpoint behind."""
    source = described_model("vgg11_bn", 0.0625, seed=0, num_classes=5, channels=3).eval()
    source.to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(3)
    images = [x.contiguous(memory_format=torch.channels_last) for x in torch.randn(16, 3, 28, 28, generator=g).split(8)]
    plan = full_plan(trace(source, images[0][:1]))
    broken = copy.deepcopy(source)
    with torch.no_grad():
        for p in broken.parameters():
            p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    layouts, roots = [], []
    load, init = frontier.Checkpoints.load, frontier.Checkpoints.__init__

    def recording_load(self, index: int, batch: int) -> torch.Tensor:
        value = load(self, index, batch)
        if index != frontier.INPUT and value.dim() == 4:
            layouts.append(value.is_contiguous(memory_format=torch.channels_last) and not value.is_contiguous())
        return value

    def recording_init(self, root, inputs, wanted) -> None:
        roots.append(root)
        init(self, root, inputs, wanted)

    states = []
    for budget in (0, 1 << 40):
        model = copy.deepcopy(broken)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(frontier.Checkpoints, "load", recording_load)
            mp.setattr(frontier.Checkpoints, "__init__", recording_init)
            reconstruct(model, source, plan, images, memory_budget=budget)
        states.append(model.state_dict())
    assert layouts and all(layouts)  # channels-last maps were checkpointed and resumed as such
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k

    calls = []

    def failing_refit(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("stop")
        return real_refit(*args, **kwargs)

    real_refit = recon_module._refit
    roots.clear()
    with pytest.MonkeyPatch.context() as mp, pytest.raises(RuntimeError, match="stop"):
        mp.setattr(frontier.Checkpoints, "__init__", recording_init)
        mp.setattr(recon_module, "_refit", failing_refit)
        reconstruct(copy.deepcopy(broken), source, plan, images, memory_budget=0)
    assert roots and not any(root.exists() for root in roots) and not roots[0].parent.exists()
