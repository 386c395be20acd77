"""Shared test settings."""
from __future__ import annotations

import torch

# Tiny models run many times faster single-threaded on a loaded 2-core machine.
torch.set_num_threads(1)
