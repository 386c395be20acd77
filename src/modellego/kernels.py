"""A fused GPU kernel for the per-sample contribution sums (optional; needs Triton).

The torch path writes the per-sample contraction s[b, q, p] = Σ_j u[b, p, j] · w[p, j, q] to
memory, clamps it, and sums it by class: three passes over a B×Q×P block that is bound by
memory traffic, not arithmetic (J is 9 or less). This kernel keeps each (p, q) tile's weights in
registers, walks the samples of one class, and adds ReLU(s) to a register accumulator, so s never
reaches memory and each sum is written once. Samples are sorted by class on the device (no host
sync); a program handles one tile of input channels × filters for one class.

Triton compiles for a GPU. With ``TRITON_INTERPRET=1`` in the environment before Triton is first
imported, it runs on the CPU instead (slowly): that is how the tests check it against the literal
Eq. 3 on machines without a GPU.
"""
from __future__ import annotations

import functools
import os

import torch

from .errors import UserError

# (input channel, filter) pairs per program: up to MAX_BLOCK_Q filters, as many input channels as
# fill the tile (4 × 64 for a plain convolution, 128 × 2 for a depthwise one, whose groups hold a
# single filter). The kernel offsets are padded to a power of two.
TILE = 256
MAX_BLOCK_Q = 64


@functools.cache
def available() -> bool:
    """Whether Triton is importable."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def require(device: torch.device) -> None:
    """Refuse, with one clear line, to run the kernel where it cannot: no Triton, or no GPU.

    Raises:
        UserError: Triton is missing, or `device` is not CUDA and the interpreter is off.
    """
    if not available():
        raise UserError("kernel 'triton' needs Triton, which ships with CUDA builds of torch (pip install triton)")
    if device.type != "cuda" and not interpreting():
        raise UserError(f"kernel 'triton' runs on a CUDA device, not {device}; use the default kernel 'torch'")


@functools.cache
def _compiled(interpret: bool):
    """The Triton kernel, decorated once per interpreter setting (Triton reads it at decoration)."""
    import triton
    import triton.language as tl

    @triton.jit
    def relu_class_sums_kernel(u_ptr, w_ptr, out_ptr, starts_ptr, n_p, n_q, n_j,
                               su_b, su_p, su_j, sw_p, sw_j, sw_q, so_p, so_c, so_q,
                               BLOCK_P: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr):
        tile = tl.program_id(0)
        c = tl.program_id(1)
        n_qb = tl.cdiv(n_q, BLOCK_Q)
        p = (tile // n_qb) * BLOCK_P + tl.arange(0, BLOCK_P)  # (BP,)
        q = (tile % n_qb) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,)
        j = tl.arange(0, BLOCK_J)  # (BJ,)
        pm, qm, jm = p < n_p, q < n_q, j < n_j
        w = tl.load(w_ptr + p[:, None, None] * sw_p + j[None, :, None] * sw_j + q[None, None, :] * sw_q,
                    mask=pm[:, None, None] & jm[None, :, None] & qm[None, None, :], other=0.0)  # (BP, BJ, BQ)
        acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=w.dtype)
        start = tl.load(starts_ptr + c)
        stop = tl.load(starts_ptr + c + 1)
        for b in range(start, stop):
            u = tl.load(u_ptr + b * su_b + p[:, None] * su_p + j[None, :] * su_j,
                        mask=pm[:, None] & jm[None, :], other=0.0)  # (BP, BJ)
            s = tl.sum(u[:, :, None] * w, axis=1)  # (BP, BQ): one sample's contributions
            acc += tl.maximum(s, 0.0)  # ReLU per sample, summed over the class
        out = out_ptr + p[:, None] * so_p + c * so_c + q[None, :] * so_q
        mask = pm[:, None] & qm[None, :]
        tl.store(out, tl.load(out, mask=mask, other=0.0) + acc, mask=mask)

    return relu_class_sums_kernel


def relu_class_sums(u: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, out: torch.Tensor) -> None:
    """out[p, c, q] += Σ_{b of class c} ReLU(Σ_j u[b, p, j] · w[p, j, q]), fused (in place).

    Shape: u (B, P, J), w (P, J, Qg), slots (B,) in [0, C), out (P, C, Qg).

    Raises:
        UserError: see `require`.
    """
    require(u.device)
    b, p, j = u.shape
    if w.shape[:2] != (p, j) or out.shape != (p, out.shape[1], w.shape[2]) or slots.shape != (b,):
        raise ValueError(f"shapes do not match: u {tuple(u.shape)}, w {tuple(w.shape)}, slots {tuple(slots.shape)}, "
                         f"out {tuple(out.shape)}")
    if b == 0:
        return
    n_c = out.shape[1]
    order = torch.argsort(slots, stable=True)
    u = u.index_select(0, order).to(out.dtype)  # class-sorted samples, (B, P, J)
    w = w.to(out.dtype)
    counts = torch.zeros(n_c, dtype=torch.long, device=slots.device).scatter_add_(0, slots, torch.ones_like(slots))
    starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (C + 1,), on the device: no host sync
    qg = w.shape[2]
    block_q = max(2, min(MAX_BLOCK_Q, _pow2(qg)))  # at least 2: no size-1 block axis
    block_p = TILE // block_q
    grid = (_cdiv(p, block_p) * _cdiv(qg, block_q), n_c)
    _compiled(interpreting())[grid](u, w, out, starts, p, qg, j, *u.stride(), *w.stride(), *out.stride(),
                               BLOCK_P=block_p, BLOCK_Q=block_q, BLOCK_J=max(2, _pow2(j)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())
