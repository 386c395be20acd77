"""What the fused contribution kernel compiles to on a Hopper GPU, read without a GPU.

Triton's wheel bundles NVIDIA's assembler and disassembler, so the kernel can be compiled for
sm_90 on any machine and its machine code (SASS) read: registers, spills, and the instructions
of the sample loop. The figure that matters is how many instructions the loop issues per useful
multiply-add (one of the layer's J offsets, not padding): the loop is what runs for every block
of samples, and an FMA-bound loop is the kernel doing its job. This is evidence about the code, not a timing; timings need a GPU
(benchmarks/cuda_check.sh).

    TRITON_INTERPRET= python benchmarks/kernel_sass.py
    python benchmarks/kernel_sass.py --arch 90 --dtype float32 --blocks 32x64x9 16x16x4

Rows go to benchmarks/results/kernel_sass.jsonl.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rows import record  # the script's folder is on sys.path

# A SASS line: /*0a30*/  @!P0 FFMA R4, R5, R6, R4 ;
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?([A-Z0-9]+)")
BRANCH = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[0-9T]\s+)?BRA\s+(?:\S+\s+)?(0x[0-9a-f]+)")
FMA = ("FFMA", "DFMA", "DMMA")  # DMMA: one 8×8×4 fp64 matrix product per warp


def sample_loop(sass: str) -> collections.Counter:
    """Opcode counts of the longest backward branch's body: the loop over blocks of samples."""
    best = (0, 0)
    for m in BRANCH.finditer(sass):
        at, target = int(m.group(1), 16), int(m.group(2), 16)
        if target < at and at - target > best[1] - best[0]:
            best = (target, at)
    ops = collections.Counter()
    for m in INSTRUCTION.finditer(sass):
        if best[0] <= int(m.group(1), 16) <= best[1]:
            ops[m.group(2)] += 1
    return ops


def inspect(arch: int, dtype: torch.dtype, block_b: int, block_q: int, offsets: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas  # the assembler Triton itself uses for `arch`

    from modellego.core import kernels

    compiled = kernels.compile_ahead(arch, dtype, block_b, block_q, offsets)
    product_j, last_apart = kernels._block_j(offsets)  # how the dispatcher splits J
    tools = Path(get_ptxas(arch).path).parent
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = Path(tmp, "k.ptx"), Path(tmp, "k.cubin")
        ptx.write_text(compiled.asm["ptx"])
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", str(cubin)],
                             capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True,
                              check=True).stdout
    loop = sample_loop(sass)
    threads = 32 * compiled.metadata.num_warps
    useful = block_b * block_q * offsets / threads  # multiply-adds of the layer per thread per loop pass
    issued = sum(loop.values())
    return {
        "arch": f"sm_{arch}", "dtype": str(dtype).removeprefix("torch."), "block_b": block_b, "block_q": block_q,
        "offsets": offsets, "warps": compiled.metadata.num_warps,
        "registers": int(re.search(r"Used (\d+) registers", log).group(1)),
        "spill_bytes": sum(int(n) for n in re.findall(r"(\d+) bytes spill", log)),
        "product_j": product_j, "last_apart": last_apart, "loop_instructions": issued, "loop_fma_instructions": sum(loop[k] for k in FMA),
        "fma_per_thread": useful, "instructions_per_fma": round(issued / useful, 3),
        "loop_barriers": loop["BAR"], "loop_opcodes": dict(loop.most_common()),
        "triton": __import__("triton").__version__, "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--dtype", choices=("float32", "float64"), nargs="+", default=["float32", "float64"])
    parser.add_argument("--blocks", nargs="+", default=["32x64x9", "32x64x16", "16x16x9", "32x64x4", "32x64x25"],
                        help="samples x filters per program (as the dispatcher picks them) x the layer's kernel "
                             "offsets J (9: a 3x3 kernel; 16 shows what padding 9 to 16 would issue)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_sass.jsonl")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET"):
        parser.error("unset TRITON_INTERPRET: this compiles for a GPU")
    print("| dtype | samples × filters × J | J in the product | registers | spills | loop instructions "
          "| of which FMA | instructions per useful FMA |")
    print("|---|---|---|---|---|---|---|---|")
    for dtype in args.dtype:
        for blocks in args.blocks:
            row = inspect(args.arch, getattr(torch, dtype), *map(int, blocks.split("x")))
            record(row, args.out, echo=False)
            product = f"{row['product_j']} + 1 apart" if row["last_apart"] else row["product_j"]
            print(f"| {dtype} | {blocks} | {product} | {row['registers']} | {row['spill_bytes']} B "
                  f"| {row['loop_instructions']} "
                  f"| {row['loop_fma_instructions']} | {row['instructions_per_fma']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
