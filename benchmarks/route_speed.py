"""What per-sample routes cost: `sample_routes` on a batch against a forward pass of the same batch.

Random weights (the cost does not depend on them), grey 28×28 inputs, benchmark widths, one
process. The two are timed interleaved, median of the repeats, so that a busy machine slows both.

    python benchmarks/route_speed.py
    python benchmarks/route_speed.py --batch 256 --repeats 7 --models lenet5 vgg16_bn
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from rows import record
from train_zoo import ZOO

import modellego
from modellego.apps.routes import sample_routes
from modellego.core.graph import trace

TARGET = 3.0  # the most a batch's routes may cost, in forward passes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lenet5", "vgg16_bn", "resnet18", "googlenet", "mobilenet_v2"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/route_speed.jsonl"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"| model | width | batch | forward ms | routes ms | ratio (target <= {TARGET:g}) |\n|---|---|---|---|---|---|")
    for name in args.models:
        width = ZOO[name]["width"]
        model = modellego.create_model(name, num_classes=10, in_channels=1, width=width).eval()
        x = torch.randn(args.batch, 1, 28, 28)
        graph = trace(model, x[:1])
        fwd, rts = [], []
        with torch.no_grad():
            model(x)
        sample_routes(model, x, graph=graph)  # warm-up
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            with torch.no_grad():
                model(x)
            t1 = time.perf_counter()
            sample_routes(model, x, graph=graph)
            t2 = time.perf_counter()
            fwd.append(t1 - t0)
            rts.append(t2 - t1)
        f, r = statistics.median(fwd), statistics.median(rts)
        row = {"model": name, "width": width, "batch": args.batch, "forward_ms": round(1e3 * f, 2),
               "routes_ms": round(1e3 * r, 2), "ratio": round(r / f, 2), "repeats": args.repeats, "threads": torch.get_num_threads(),
               "torch": torch.__version__}
        record(row, args.out, echo=False)
        print(f"| {name} | {width:g} | {args.batch} | {row['forward_ms']:.1f} | {row['routes_ms']:.1f} | {row['ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
