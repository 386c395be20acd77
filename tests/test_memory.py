"""The memory budget read from the device, and how profiling, selection and recon use it."""
from __future__ import annotations

import copy

import psutil
import pytest
import torch
import torch.nn as nn

from modellego.calibration.reconstruct import reconstruct
from modellego.core.graph import trace
from modellego.core.samples import SelectionConfig
from modellego.cut.prune import full_plan
from modellego.errors import UserError
from modellego.memory import FREE_SHARE, default_budget, free_bytes


def test_free_host_memory_is_positive_and_below_the_total() -> None:
    free = free_bytes("cpu")
    assert 0 < free <= psutil.virtual_memory().total
    # Half of it, within what other processes allocate or free between the two reads.
    assert abs(default_budget("cpu") - FREE_SHARE * free_bytes("cpu")) < 0.05 * free


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_free_cuda_memory_counts_what_the_allocator_cached() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    before = free_bytes("cuda")
    assert 0 < before <= total
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    held = free_bytes("cuda")
    del x  # back to the allocator's cache, not to the device: still free for us
    assert held < before and free_bytes("cuda") > held + (200 << 20)


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


@pytest.mark.parametrize("free", [1 << 40, 1000])
def test_recon_holds_values_within_half_the_free_memory_of_the_batches_device(
        free: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """With plenty free, one pass of each model; with 1,000 bytes free, the layers resume the models
    from checkpoints; the weights are the same either way."""
    asked: list[torch.device] = []

    def fake_free(device: torch.device | str) -> int:
        asked.append(torch.device(device))
        return free

    monkeypatch.setattr("modellego.memory.free_bytes", fake_free)
    source, broken, plan, images = _perturbed_pair()
    model = copy.deepcopy(broken)
    with caplog.at_level("INFO", logger="modellego"):
        reconstruct(model, source, plan, images)
    assert asked == [images[0].device]
    outgrown = [r.message for r in caplog.records if "outgrow" in r.message]
    assert bool(outgrown) == (free == 1000)
    if outgrown:  # at the first layer: 500 bytes hold less than one image's values
        assert f"outgrow {int(free * FREE_SHARE)} bytes at 0;" in outgrown[0], outgrown
    explicit = copy.deepcopy(broken)
    reconstruct(explicit, source, plan, images, memory_budget=0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, explicit.state_dict()[k]), k


def test_a_negative_budget_is_refused_before_anything_changes() -> None:
    source, broken, plan, images = _perturbed_pair()
    model = copy.deepcopy(broken)
    with pytest.raises(UserError, match="memory_budget must be a number of bytes >= 0, got -1"):
        reconstruct(model, source, plan, images, memory_budget=-1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, broken.state_dict()[k]), k


def test_profiling_holds_the_sums_of_as_many_classes_as_half_the_free_memory_fits(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Free memory for the sums of 4 classes: budget for 2, so 5 classes take 3 passes; the
    profile equals one pass over all classes."""
    import modellego
    import modellego.core.profiling as profiling

    source, _, _, images = _perturbed_pair()
    labels = [torch.arange(len(x)) % 5 for x in images]
    layers = trace(source, images[0][:1]).layers.values()
    per_class = 4 * sum(l.out_features * l.in_features for l in layers)  # float32, no groups
    monkeypatch.setattr("modellego.memory.free_bytes", lambda device: 4 * per_class)
    passes: list[list[int]] = []
    real = profiling.contributions

    def counted(*args, **kwargs):
        passes.append(list(args[3]))
        return real(*args, **kwargs)

    monkeypatch.setattr(profiling, "contributions", counted)
    chunked = modellego.profile(source, list(zip(images, labels)), select=False)
    assert passes == [[0, 1], [2, 3], [4]]
    whole = modellego.profile(source, list(zip(images, labels)), select=False, memory_budget=5 * per_class)
    assert passes[3:] == [[0, 1, 2, 3, 4]]
    for k in whole.layers:
        assert torch.equal(chunked.in_masks[k], whole.in_masks[k]) and torch.equal(chunked.out_masks[k], whole.out_masks[k])
    with pytest.raises(UserError, match="memory_budget must be a number of bytes >= 0, got -1"):
        modellego.profile(source, list(zip(images, labels)), select=False, memory_budget=-1)
    with pytest.raises(UserError, match="class_chunk must be at least 1, got 0"):
        modellego.profile(source, list(zip(images, labels)), select=False, class_chunk=0)


class _Counted(list):
    """A list of batches that counts its readings."""

    readings = 0

    def __iter__(self):
        self.readings += 1
        return super().__iter__()


def test_selection_reads_the_batches_again_once_its_candidates_pass_half_the_free_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import modellego

    source, _, _, images = _perturbed_pair()
    with torch.no_grad():
        labels = [source(x).argmax(1) for x in images]  # every sample correct: every one a candidate
    held = _Counted(zip(images, labels))
    whole = modellego.profile(source, held, select=SelectionConfig(0.5, 1))
    monkeypatch.setattr("modellego.memory.free_bytes", lambda device: 0)
    again = _Counted(zip(images, labels))
    reread = modellego.profile(source, again, select=SelectionConfig(0.5, 1))
    assert (held.readings, again.readings) == (1, 2)
    assert reread.provenance["selection"] == whole.provenance["selection"]
    for k in whole.layers:
        assert torch.equal(reread.in_masks[k], whole.in_masks[k]) and torch.equal(reread.out_masks[k], whole.out_masks[k])
    explicit = _Counted(zip(images, labels))  # a budget given overrides the free memory
    modellego.profile(source, explicit, select=SelectionConfig(0.5, 1, hold_budget=10**12))
    assert explicit.readings == 1
