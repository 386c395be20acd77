#!/usr/bin/env bash
# One short run of every GPU check, for a machine with a CUDA device and a CUDA build of torch:
# 1. the CUDA tests (each GPU result against the CPU's), the fused Triton kernel's tests, the
#    GPU's free memory as recon and profiling read it, and profiling in a process group of two
#    processes on the GPU;
# 2. profiling speed on the GPU at batch 128 (with the literal form) and 1024, first with the
#    default kernel, then with the fused Triton kernel (`--kernel triton`), and both kernels with
#    forward and profile passes alternated in one process (`--interleaved`);
# 3. each layer against its own forward at batch 1024, with both kernels (where the gap comes from);
# 4. the default kernel at batch 1024 with larger contraction blocks than 2^24 elements.
# A failing test does not stop the measurements; the script then exits non-zero. Results are
# appended to benchmarks/results/contribution_speed.jsonl and contribution_layers.jsonl, or under
# $OUT when set.
#
#     bash benchmarks/cuda_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')" || exit 1
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
status=0
speed() { PYTHONPATH=src python benchmarks/contribution_speed.py --device cuda --repeats 5 "$@" || status=1; }
PYTHONPATH=src python -m pytest -q tests/test_cuda.py tests/test_kernels.py -rs \
    "tests/test_memory.py::test_free_cuda_memory_counts_what_the_allocator_cached" \
    "tests/test_distributed.py::test_a_group_profiling_on_a_gpu_gets_the_profile_of_all_the_data" || status=1
speed --out "$out/contribution_speed.jsonl"
speed --batch 1024 --methods forward profile --out "$out/contribution_speed.jsonl"
for batch in 128 1024; do
    speed --batch "$batch" --methods forward profile --kernel triton --out "$out/contribution_speed.jsonl"
done
for kernel in torch triton; do
    speed --interleaved --repeats 9 --kernel "$kernel" --out "$out/contribution_speed.jsonl"
done
for kernel in torch triton; do
    speed --batch 1024 --per-layer --kernel "$kernel" --layers-out "$out/contribution_layers.jsonl"
done
for chunk in 67108864 268435456; do  # 2^26 and 2^28 elements (256 MiB and 1 GiB in float32)
    speed --batch 1024 --methods profile --chunk-elements "$chunk" --out "$out/contribution_speed.jsonl"
done
exit $status
