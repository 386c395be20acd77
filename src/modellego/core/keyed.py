"""Random numbers keyed by integers: the same keys give the same numbers in any batch, process or
device, so a sample drawn by its position in a stream is drawn alike however the stream is split.

A generator's stream depends on how many numbers were taken before; these do not. The mixing is
a 32-bit integer hash (xor-shift and multiply, as in Murmur3's finaliser) computed in int64 with
every product below 2**63, so it is exact on any device (no reliance on integer overflow).
"""
from __future__ import annotations

import torch

_MASK = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), splitting x in 16-bit halves so no product overflows."""
    lo, hi = x & 0xFFFF, x >> 16
    return (lo * c + (((hi * c) & 0xFFFF) << 16)) & _MASK


def mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit hash of each element of `x` (int64 in [0, 2**32)); equal inputs, equal outputs."""
    x = x & _MASK
    x = _mul32(x ^ (x >> 16), 0x85EBCA6B)
    x = _mul32(x ^ (x >> 13), 0xC2B2AE35)
    return x ^ (x >> 16)


def keyed(seed: int, *keys: int | torch.Tensor) -> torch.Tensor:
    """32-bit hashes of (seed, *keys), broadcast over tensor keys (non-negative ints below 2**32).

    Shape: the broadcast shape of the tensor keys (a 0-d tensor for int keys only).
    """
    h = mix(torch.tensor(seed & _MASK, dtype=torch.int64))
    for k in keys:
        k = torch.as_tensor(k, dtype=torch.int64, device=k.device if isinstance(k, torch.Tensor) else h.device)
        h = mix(h.to(k.device) ^ k)
    return h


def keyed_uniform(seed: int, ids: torch.Tensor) -> torch.Tensor:
    """A float64 in [0, 1) for each id, from 53 bits of two chained hashes. Shape: as `ids`."""
    hi = keyed(seed, ids)
    lo = mix(hi ^ 0x9E3779B9)
    return ((hi << 21) | (lo >> 11)).double() / 2.0**53
