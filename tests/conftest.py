"""Shared test settings."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels run in Triton's CPU interpreter (tests/test_kernels.py). Triton
# reads this when it is first imported, so it is set before any test can import it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiny models run many times faster single-threaded on a loaded 2-core machine.
torch.set_num_threads(1)
