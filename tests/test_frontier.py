"""Recon's checkpoints: where the cuts are, which are written, and what is saved comes back equal,
in its layout, aligned as PyTorch allocates."""
from __future__ import annotations

import pytest
import torch

from modellego.calibration.frontier import INPUT, Checkpoints, TracedGraph


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
