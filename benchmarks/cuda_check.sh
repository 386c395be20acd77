#!/usr/bin/env bash
# One short run of every GPU check, for a machine with a CUDA device and a CUDA build of torch:
# the CUDA tests (each GPU result against the CPU's), then profiling speed on the GPU at batch 128
# (with the literal form) and 1024 (forward and profile only), then each layer against its own
# forward at batch 1024 (which layers the gap comes from), then the profile at batch 1024 with
# larger contraction blocks than the default 2^24 elements (fewer launches per layer). Results are appended to
# benchmarks/results/contribution_speed.jsonl and contribution_layers.jsonl, or under $OUT when set.
#
#     bash benchmarks/cuda_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
out="${OUT:-benchmarks/results}"
mkdir -p "$out"
PYTHONPATH=src python -m pytest -q tests/test_cuda.py -rs
PYTHONPATH=src python benchmarks/contribution_speed.py --device cuda --repeats 5 --out "$out/contribution_speed.jsonl"
PYTHONPATH=src python benchmarks/contribution_speed.py --device cuda --batch 1024 --methods forward profile \
    --repeats 5 --out "$out/contribution_speed.jsonl"
PYTHONPATH=src python benchmarks/contribution_speed.py --device cuda --batch 1024 --per-layer --repeats 5 \
    --layers-out "$out/contribution_layers.jsonl"
for chunk in 67108864 268435456; do  # 2^26 and 2^28 elements (256 MiB and 1 GiB in float32)
    PYTHONPATH=src python benchmarks/contribution_speed.py --device cuda --batch 1024 --methods profile \
        --chunk-elements "$chunk" --repeats 5 --out "$out/contribution_speed.jsonl"
done
