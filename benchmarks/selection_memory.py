"""Memory of sample selection on a 1000-class head: candidates held, or read again.

`select_samples` keeps up to `max_per_class` candidates per class during its pass, because how
many it keeps (`fraction` of the correct ones) is known only at the end. Holding their inputs
grows with classes × max_per_class × image size; past `hold_budget` it keeps only their scores and
positions and reads the batches a second time for the selected inputs. This measures both on
synthetic data whose labels the "model" reads back from the image (so nearly every sample is
correct and becomes a candidate), each in a fresh process: wall time and peak resident memory
above the footprint before selection.

    python benchmarks/selection_memory.py                         # 1000 classes, 64,000 images of 3x32x32
    python benchmarks/selection_memory.py --classes 100 --size 64
    python benchmarks/selection_memory.py --zoo lenet5:mnist       # a zoo model on its real training set

Rows go to benchmarks/results/selection_memory.jsonl.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402

from modellego.core.samples import select_samples  # noqa: E402


class Synthetic:
    """Seeded random images whose first pixel encodes the label; the same batches at every reading."""

    def __init__(self, classes: int, images: int, size: int, batch: int = 256) -> None:
        self.classes, self.images, self.size, self.batch = classes, images, size, batch

    def __len__(self) -> int:
        return -(-self.images // self.batch)

    def __iter__(self):
        for b in range(len(self)):
            g = torch.Generator().manual_seed(b)
            n = min(self.batch, self.images - b * self.batch)
            y = torch.randint(0, self.classes, (n,), generator=g)
            x = torch.rand(n, 3, self.size, self.size, generator=g)  # (B, 3, S, S)
            x[:, 0, 0, 0] = (y.float() + 0.5) / self.classes
            yield x, y


class ReadsLabel(nn.Module):
    """Logits peaked at the label written in the first pixel, with some noise from the rest, so that
    the samples' scores differ."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.register_buffer("centres", torch.arange(classes).float() + 0.5)
        self.noise = nn.Parameter(torch.tensor(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        code = x[:, 0, 0, 0:1] * len(self.centres)  # (B, 1)
        return -(code - self.centres) ** 2 + self.noise * x[:, 1].mean((1, 2))[:, None]  # (B, classes)


def _zoo(spec: str) -> tuple[object, nn.Module]:
    from train_zoo import get_model

    from modellego.data import batches, load_dataset
    from modellego.evaluation.protocol import model_transform

    name, data = spec.split(":")
    model = get_model(Path(".cache/zoo"), name, data).eval()
    ds = load_dataset(data)
    return batches(ds.train, 256, transform=model_transform(model, ds)), model


def child(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.zoo:
        data, model = _zoo(args.zoo)
    else:
        data, model = Synthetic(args.classes, args.images, args.size), ReadsLabel(args.classes)
    before = psutil.Process().memory_info().rss
    t = time.perf_counter()
    budget = {} if args.hold_budget is None else {"hold_budget": args.hold_budget}
    sel = select_samples(model, data, **budget)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    print(json.dumps({"seconds": round(seconds, 2), "extra_mib": round((peak - before) / 2**20),
                      "selected": len(sel.labels), "correct": sum(sel.correct.values()),
                      "selection_mib": round(sel.inputs.numel() * 4 / 2**20, 1)}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--images", type=int, default=64_000)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--zoo", metavar="MODEL:DATA", help="a cached zoo model and its training set instead")
    p.add_argument("--budgets", nargs="+", default=["default", "0"],
                   help="hold_budget values in bytes; 'default' is half the host's available memory")
    p.add_argument("--hold-budget", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/selection_memory.jsonl"))
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    print(f"cpu, {args.threads} threads, torch {torch.__version__}; " + (
        args.zoo or f"{args.classes} classes, {args.images:,} images of 3x{args.size}x{args.size}"))
    print("| hold_budget | seconds | extra MiB | selected | selected inputs MiB |\n|---|---|---|---|---|")
    for budget in args.budgets:
        cmd = [sys.executable, __file__, "--child", "--classes", str(args.classes), "--images", str(args.images),
               "--size", str(args.size), "--threads", str(args.threads)] + (["--zoo", args.zoo] if args.zoo else [])
        if budget != "default":
            cmd += ["--hold-budget", budget]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(proc.stderr[-3000:])
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        data = {"zoo": args.zoo} if args.zoo else {"classes": args.classes, "images": args.images, "size": args.size}
        row.update(hold_budget=budget, threads=args.threads, torch=torch.__version__, **data)
        record(row, args.out, echo=False)
        print(f"| {budget} | {row['seconds']} | {row['extra_mib']} | {row['selected']:,} | {row['selection_mib']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
