"""How much memory a computation may hold on a device, read from the device at the time."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys

import psutil
import torch

# Of the memory free when a computation starts, the share its held values may take: the rest is
# left to the models, their intermediates and whatever else runs on the machine.
FREE_SHARE = 0.5


def free_bytes(device: torch.device | str) -> int:
    """Bytes free on `device` now: on a GPU, the device's free memory plus what PyTorch's allocator
    has cached but not handed out; otherwise the host's available memory (a CPU, or an
    accelerator that shares the host's memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    return int(psutil.virtual_memory().available)


def host_processes() -> int:
    """Processes of this launch that share this host's memory: torchrun's ``LOCAL_WORLD_SIZE``, else 1."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def default_budget(device: torch.device | str) -> int:
    """`FREE_SHARE` of the bytes free on `device` now, split between the processes that share it.

    Host memory is shared by every process torchrun started on this machine, each reading the same
    free memory, so each takes its share of the budget; a GPU is its process's own.
    """
    share = FREE_SHARE if torch.device(device).type == "cuda" else FREE_SHARE / host_processes()
    return int(free_bytes(device) * share)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> bool:
    """Give the host the memory freed so far that the C allocator still holds; True if it could.

    Locating a class allocates and frees a few dozen tensors of a few MiB each. glibc serves such
    blocks from its heap once it has freed blocks that large, and the heap keeps the pages, so a
    1000-class profile of ResNet-50 grew from 0.9 to 1.5 GiB over 300 classes with no tensor held.
    Trimming after each chunk of classes keeps it flat at the cost of one heap walk.
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
