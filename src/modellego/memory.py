"""How much memory a computation may hold on a device, read from the device at the time."""
from __future__ import annotations

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


def default_budget(device: torch.device | str) -> int:
    """`FREE_SHARE` of the bytes free on `device` now."""
    return int(free_bytes(device) * FREE_SHARE)
