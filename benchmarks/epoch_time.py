"""Training speed of the benchmark zoo on 28×28 grey images, measured on a quiet machine.

Times `--steps` SGD steps (batch 128, after warm-up) per model and scales to one epoch of 54,000
images (MNIST's training split less validation). Run it alone: other jobs on the same cores skew it.

    python benchmarks/epoch_time.py
    python benchmarks/epoch_time.py --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO  # noqa: E402

from modellego.models import create_model  # noqa: E402

EPOCH_IMAGES = 54000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ZOO))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/epoch_time.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"CPU, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, "
          f"bf16={args.bf16}, channels_last={args.channels_last}")
    print("| model | width | s/step (median) | s/epoch (54,000 images) |")
    print("|---|---|---|---|")
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, num_classes=10, in_channels=1, width=ZOO[name]["width"]).train()
        fmt = torch.channels_last if args.channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(args.batch, 1, 28, 28).contiguous(memory_format=fmt)
        y = torch.randint(0, 10, (args.batch,))
        times = []
        for i in range(args.steps + 2):
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(model(x).float(), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if i >= 2:  # warm-up
                times.append(time.perf_counter() - t)
        step = statistics.median(times)
        row = {"model": name, "width": ZOO[name]["width"], "batch": args.batch, "s_per_step": round(step, 4),
               "s_per_epoch": round(step * EPOCH_IMAGES / args.batch, 1), "bf16": args.bf16,
               "channels_last": args.channels_last, "threads": torch.get_num_threads(), "torch": torch.__version__}
        record(row, args.out, echo=False)
        print(f"| {name} | {row['width']} | {row['s_per_step']} | {row['s_per_epoch']} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
