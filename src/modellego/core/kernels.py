"""A fused GPU kernel for the per-sample contribution sums (optional; needs Triton).

The torch path writes the per-sample contraction s[b, q, p] = Σ_j u[b, p, j] · w[p, j, q] to
memory, clamps it, and sums it by class: three passes over a B×Q×P block that is bound by
memory traffic, not arithmetic (J is 9 or less). Here one program owns one input channel p, a
block of filters and one class. It keeps w[p] in registers, walks the class's samples a block
at a time, and for each block computes s as a small matrix product (samples × J) @ (J × filters)
in full fp32 or fp64 (no TF32), clamps it, and adds it to an accumulator of the same shape. The
samples are summed once, at the end, so the loop holds no cross-thread reduction, s never
reaches memory, and each class sum is written once.

Samples are sorted by class on the device, without a host sync, once per batch when the caller
shares the order (`class_order`) between layers.

Triton compiles for a GPU. With ``TRITON_INTERPRET=1`` in the environment before Triton is first
imported, it runs on the CPU instead (slowly): that is how the tests check it against the literal
Eq. 3 on machines without a GPU; they also compile it for a Hopper GPU where Triton's own
assembler is present, so a kernel the interpreter accepts but the compiler refuses fails there.
"""
from __future__ import annotations

import functools
import os

import torch

from ..errors import UserError

# Block sizes. tl.dot needs at least 16 rows and columns and 8 reduction steps; the kernel
# offsets J (9 for a 3×3 kernel, 4 for a folded 2×2 map) are padded to 8 or a power of two,
# except that a power of two plus one (9) leaves its last offset out of the product (`_block_j`).
MIN_BLOCK = 16
MIN_BLOCK_J = 8
MAX_BLOCK_Q = 64
# Samples per step: 32 when classes hold more than 16 samples of a batch on average, else 16.
MAX_BLOCK_B = 32
DTYPES = (torch.float32, torch.float64)
# Multiply-adds fused (one rounding), stated rather than left to Triton's default, which changes.
FP_FUSION = True


@functools.cache
def available() -> bool:
    """Whether Triton is importable."""
    try:
        import triton  # noqa: F401  (imported only to see whether it can be)
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
    def relu_class_sums_kernel(u_ptr, w_ptr, out_ptr, starts_ptr, n_q, n_j,
                               su_p, su_b, su_j, sw_p, sw_j, sw_q, so_p, so_c, so_q,
                               BLOCK_B: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_J: tl.constexpr,
                               LAST_APART: tl.constexpr):
        p = tl.program_id(0)
        c = tl.program_id(2)
        start = tl.load(starts_ptr + c)
        stop = tl.load(starts_ptr + c + 1)
        if stop > start:  # a class without samples in this batch reads and writes nothing
            q = tl.program_id(1) * BLOCK_Q + tl.arange(0, BLOCK_Q)  # (BQ,)
            j = tl.arange(0, BLOCK_J)  # (BJ,)
            n_dot = n_j - 1 if LAST_APART else n_j  # offsets in the matrix product
            qm, jm = q < n_q, j < n_dot
            w = tl.load(w_ptr + p * sw_p + j[:, None] * sw_j + q[None, :] * sw_q,
                        mask=jm[:, None] & qm[None, :], other=0.0)  # (BJ, BQ)
            if LAST_APART:
                w_last = tl.load(w_ptr + p * sw_p + n_dot * sw_j + q * sw_q, mask=qm, other=0.0)  # (BQ,)
            acc = tl.zeros((BLOCK_B, BLOCK_Q), dtype=w.dtype)
            for b0 in range(start, stop, BLOCK_B):
                b = b0 + tl.arange(0, BLOCK_B)  # (BB,)
                bm = b < stop  # rows past the class load as 0 and add ReLU(0) = 0
                u = tl.load(u_ptr + p * su_p + b[:, None] * su_b + j[None, :] * su_j,
                            mask=bm[:, None] & jm[None, :], other=0.0)  # (BB, BJ)
                s = tl.dot(u, w, input_precision="ieee")  # (BB, BQ)
                if LAST_APART:
                    u_last = tl.load(u_ptr + p * su_p + b * su_b + n_dot * su_j, mask=bm, other=0.0)  # (BB,)
                    s += u_last[:, None] * w_last[None, :]
                acc += tl.maximum(s, 0.0)  # ReLU per sample
            out = out_ptr + p * so_p + c * so_c + q * so_q
            tl.store(out, tl.load(out, mask=qm, other=0.0) + tl.sum(acc, axis=0), mask=qm)

    return relu_class_sums_kernel


def class_order(slots: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The samples sorted by class, and where each class starts in that order (on the device).

    Shape: slots (B,) in [0, num_classes) -> order (B,), starts (num_classes + 1,).
    """
    order = torch.argsort(slots, stable=True)
    counts = torch.zeros(num_classes, dtype=torch.long, device=slots.device)
    counts.scatter_add_(0, slots, torch.ones_like(slots))
    return order, torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # no host sync


def relu_class_sums(u: torch.Tensor, w: torch.Tensor, slots: torch.Tensor, out: torch.Tensor,
                    order: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """out[p, c, q] += Σ_{b of class c} ReLU(Σ_j u[b, p, j] · w[p, j, q]), fused (in place).

    Shape: u (B, P, J), w (P, J, Qg), slots (B,) in [0, C), out (P, C, Qg), float32 or float64.

    Args:
        order: ``class_order(slots, C)``, when the caller computed it once for several layers.

    Raises:
        UserError: see `require`.
        ValueError: shapes that do not match, or a dtype other than float32/float64.
    """
    require(u.device)
    b, p, j = u.shape
    if w.shape[:2] != (p, j) or out.shape != (p, out.shape[1], w.shape[2]) or slots.shape != (b,):
        raise ValueError(f"shapes do not match: u {tuple(u.shape)}, w {tuple(w.shape)}, slots {tuple(slots.shape)}, "
                         f"out {tuple(out.shape)}")
    if out.dtype not in DTYPES:
        raise ValueError(f"the kernel sums in float32 or float64, got {out.dtype}")
    if b == 0:
        return
    n_c, qg = out.shape[1], w.shape[2]
    sample_order, starts = order if order is not None else class_order(slots, n_c)
    if sample_order.shape != (b,) or starts.shape != (n_c + 1,):
        raise ValueError(f"order does not match: {tuple(sample_order.shape)} and {tuple(starts.shape)} for "
                         f"{b} samples of {n_c} classes")
    # One copy puts the samples in class order and each channel's samples side by side.
    u = u.transpose(0, 1).index_select(1, sample_order).to(out.dtype)  # (P, B, J), contiguous
    w = w.to(out.dtype)
    block_q = max(MIN_BLOCK, min(MAX_BLOCK_Q, _pow2(qg)))
    block_b = MAX_BLOCK_B if b > MIN_BLOCK * n_c else MIN_BLOCK
    block_j, last_apart = _block_j(j)
    grid = (p, _cdiv(qg, block_q), n_c)
    _compiled(interpreting())[grid](u, w, out, starts, qg, j, *u.stride(), *w.stride(), *out.stride(),
                                    BLOCK_B=block_b, BLOCK_Q=block_q, BLOCK_J=block_j, LAST_APART=last_apart,
                                    num_warps=_warps(block_b, block_q), enable_fp_fusion=FP_FUSION)


def compile_ahead(arch: int = 90, dtype: torch.dtype = torch.float32, block_b: int = MAX_BLOCK_B,
                  block_q: int = MAX_BLOCK_Q, offsets: int = 9):
    """Compile the kernel for an NVIDIA GPU of compute capability `arch` (90: Hopper) without one.

    `block_b` and `block_q` are the sample and filter blocks, `offsets` the J of the layer.

    Triton's bundled assembler does the whole compile here, so a kernel that its CPU interpreter
    accepts but the compiler refuses is caught on any machine. Needs ``TRITON_INTERPRET`` unset.

    Returns:
        Triton's compiled kernel: ``.asm`` holds its PTX and cubin, ``.metadata`` its resources.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if interpreting():
        raise UserError("compile_ahead compiles for a GPU; unset TRITON_INTERPRET first")
    ptr = "*" + {torch.float32: "fp32", torch.float64: "fp64"}[dtype]
    ints = "n_q n_j su_p su_b su_j sw_p sw_j sw_q so_p so_c so_q".split()
    signature = {"u_ptr": ptr, "w_ptr": ptr, "out_ptr": ptr, "starts_ptr": "*i64", **dict.fromkeys(ints, "i32"),
                 **dict.fromkeys(("BLOCK_B", "BLOCK_Q", "BLOCK_J", "LAST_APART"), "constexpr")}
    block_j, last_apart = _block_j(offsets)
    source = ASTSource(fn=_compiled(False), signature=signature, constexprs={
        "BLOCK_B": block_b, "BLOCK_Q": block_q, "BLOCK_J": block_j, "LAST_APART": last_apart})
    options = {"num_warps": _warps(block_b, block_q), "enable_fp_fusion": FP_FUSION}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def _block_j(j: int) -> tuple[int, bool]:
    """The matrix product's reduction length for J offsets, and whether the last one goes apart.

    A 3×3 kernel's 9 offsets would pad to 16; 8 in the product and the ninth as a rank-1 update
    issue about 28% fewer instructions per sample block on sm_90 (benchmarks/kernel_sass.py).
    """
    if j > MIN_BLOCK_J and _pow2(j - 1) == j - 1:
        return j - 1, True
    return max(MIN_BLOCK_J, _pow2(j)), False


def _warps(block_b: int, block_q: int) -> int:
    """Warps per program: 16 accumulators per thread, so a small block does not idle most lanes."""
    return max(1, min(4, block_b * block_q // (32 * 16)))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n."""
    return 1 << max(0, (n - 1).bit_length())
