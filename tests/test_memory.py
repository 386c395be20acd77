"""The memory budget read from the device (profiling, selection and recon use it: their own test files)."""
from __future__ import annotations

import random
import sys

import psutil
import pytest
import torch

from modellego.memory import FREE_SHARE, default_budget, free_bytes, release_freed_memory


def test_free_host_memory_is_positive_and_below_the_total() -> None:
    free = free_bytes("cpu")
    assert 0 < free <= psutil.virtual_memory().total
    # Half of it, within what other processes allocate or free between the two reads.
    assert abs(default_budget("cpu") - FREE_SHARE * free_bytes("cpu")) < 0.05 * free


def test_processes_sharing_the_host_split_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("modellego.memory.free_bytes", lambda device: 8 << 30)
    assert default_budget("cpu") == int(FREE_SHARE * (8 << 30))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 processes on this machine
    assert default_budget("cpu") == int(FREE_SHARE * (8 << 30) / 4)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "not a number")
    assert default_budget("cpu") == int(FREE_SHARE * (8 << 30))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_free_cuda_memory_counts_what_the_allocator_cached() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    before = free_bytes("cuda")
    assert 0 < before <= total
    x = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    held = free_bytes("cuda")
    del x  # back to the allocator's cache, not to the device: still free for us
    assert held < before and free_bytes("cuda") > held + (200 << 20)


def _rss() -> int:
    return psutil.Process().memory_info().rss


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_heap_memory_goes_back_to_the_host() -> None:
    """Tensors of mixed sizes (64 KiB-8 MiB, as locating's temporaries) freed between small live ones
    leave glibc's heap larger than what is held, until trimmed."""
    rng = random.Random(0)
    start, pins = _rss(), []
    for _ in range(400):
        temporaries = [torch.ones(rng.randint(1 << 16, 8 << 20), dtype=torch.uint8) for _ in range(5)]
        pins.append(torch.ones(rng.randint(1 << 10, 1 << 16), dtype=torch.uint8))  # 13 MiB live in all
        del temporaries
    grown = _rss()
    assert grown > start + (64 << 20), (start >> 20, grown >> 20)  # the heap kept freed pages
    assert release_freed_memory()
    assert _rss() < grown - (64 << 20), (start >> 20, grown >> 20, _rss() >> 20)
    assert len(pins) == 400
