"""Speed and peak memory of contribution profiling vs a forward pass and vs the literal Eq. 3.

Each measurement runs in a fresh subprocess so that its peak resident memory (CPU) or peak CUDA
allocation is its own; "extra memory" is that peak minus the same process's footprint after the
model and batch were created and one warm-up forward pass ran.

    python benchmarks/contribution_speed.py                       # VGG-16 and ResNet-18, 32x32, batch 128
    python benchmarks/contribution_speed.py --models vgg16_bn --batch 64 --repeats 3
    python benchmarks/contribution_speed.py --per-layer --models vgg16_bn   # each layer vs its own forward
    python benchmarks/contribution_speed.py --interleaved --repeats 9       # time only, one process

`--interleaved` times a forward pass and a profile pass alternately in one process and reports the
median of the ratios of neighbouring pairs: on a host whose speed drifts between runs it is the
steadier figure for the time ratio (separate processes each see the host at another moment).

Prints one JSON row per measurement and a table of ratios; rows are appended to
benchmarks/results/contribution_speed.jsonl.
"""
from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from rows import record  # the script's folder is on sys.path

METHODS = ("forward", "profile", "literal")


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class LiteralAccumulator:
    """Eq. 3 as written: the (B, Q, P, H, W) hidden maps materialised, ReLU per sample, summed per class."""

    def __init__(self, module: nn.Module, num_slots: int, mode: str = "sample", workspace: object = None,
                 kernel: str = "torch") -> None:
        self.module, self.num_slots, self.state = module, num_slots, None

    @torch.no_grad()
    def update(self, x: torch.Tensor, slots: torch.Tensor) -> None:
        from modellego.core.contribution import literal_contribution
        s = literal_contribution(self.module, x.detach()).clamp(min=0)  # (B, Q, P)
        if self.state is None:
            self.state = torch.zeros(self.num_slots, *s.shape[1:], dtype=s.dtype, device=s.device)
        self.state.index_add_(0, slots, s)


def _median_time(fn, repeats: int, dev: torch.device) -> float:
    """Median wall time of `fn` over `repeats` calls after one warm-up, the device synchronised."""
    fn()
    return statistics.median(_timed(fn, dev) for _ in range(repeats))


def _timed(fn, dev: torch.device) -> float:
    """Wall time of one call of `fn`, the device synchronised before and after."""
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def run_per_layer(model_name: str, batch: int, size: int, repeats: int, device: str,
                  kernel: str = "torch") -> list[dict]:
    """One layer's contribution update against that layer's own forward, for every Conv2d and Linear.

    The accumulator is reused across repeats, as over the batches of a profile (what it memoises,
    such as a folded weight, is then in place).
    """
    from modellego.core.contribution import Workspace, make_accumulator
    from modellego.hooks import forward_hooks
    from modellego.models import create_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(model_name, num_classes=10, in_channels=3).to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    slots = (torch.arange(batch, device=dev) % 10).sort().values  # profiling sorts samples by class
    modules = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    inputs: dict[str, torch.Tensor] = {}

    def grab(name: str):
        return lambda module, args: inputs.__setitem__(name, args[0].detach().clone())

    with forward_hooks(model, {n: grab(n) for n in modules}, pre=True):
        model(x)
    ws, rows = Workspace(), []
    for name, m in modules.items():
        a = inputs[name]
        acc = make_accumulator(m, 10, workspace=ws, kernel=kernel)
        rows.append({"model": model_name, "method": "per_layer", "kernel": kernel, "layer": name, "input": list(a.shape[1:]),
                     "batch": batch, "size": size, "device": str(dev), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "repeats": repeats,
                     "forward_ms": 1e3 * _median_time(functools.partial(m, a), repeats, dev),
                     "update_ms": 1e3 * _median_time(functools.partial(acc.update, a, slots), repeats, dev)})
    return rows


def _setup(model_name: str, batch: int, size: int, device: str):
    """A seeded zoo model in eval mode, a random batch with labels 0-9 cycling, its traced graph."""
    from modellego.core.graph import trace
    from modellego.models import create_model

    torch.manual_seed(0)
    dev = torch.device(device)
    model = create_model(model_name, num_classes=10, in_channels=3).to(dev).eval()
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.arange(batch, device=dev) % 10
    return model, x, y, trace(model, x[:2]), dev


def run_interleaved(model_name: str, batch: int, size: int, repeats: int, device: str, kernel: str = "torch") -> dict:
    """Forward and profile passes alternated in one process: medians and the median pair ratio."""
    import modellego.core.profiling as profiling

    model, x, y, graph, dev = _setup(model_name, batch, size, device)

    def forward() -> None:
        with torch.no_grad():
            model(x)

    def profile() -> None:
        profiling.contributions(model, graph, [(x, y)], list(range(10)), device=dev, kernel=kernel)

    forward(), profile()  # warm-up
    pairs = [(_timed(forward, dev), _timed(profile, dev)) for _ in range(repeats)]
    return {"model": model_name, "method": "interleaved", "kernel": kernel, "batch": batch, "size": size,
            "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
            "forward_s": statistics.median(f for f, _ in pairs), "profile_s": statistics.median(p for _, p in pairs),
            "ratio": statistics.median(p / f for f, p in pairs), "ratios": [round(p / f, 3) for f, p in pairs]}


def _print_per_layer(rows: list[dict]) -> None:
    print("| model | layer | input | forward ms | contribution ms | contribution / forward |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['layer']} | {'×'.join(map(str, r['input']))} | {r['forward_ms']:.2f} | "
              f"{r['update_ms']:.2f} | {r['update_ms'] / r['forward_ms']:.2f}x |")
    for model in dict.fromkeys(r["model"] for r in rows):
        f = sum(r["forward_ms"] for r in rows if r["model"] == model)
        u = sum(r["update_ms"] for r in rows if r["model"] == model)
        print(f"| {model} | all layers | | {f:.1f} | {u:.1f} | {u / f:.2f}x |")


def run_one(model_name: str, method: str, batch: int, size: int, repeats: int, device: str,
            chunk_elements: int | None = None, kernel: str = "torch") -> dict:
    import modellego.core.contribution as contribution
    import modellego.core.profiling as profiling

    if chunk_elements:  # the largest (samples × Q × P) block per step; a GPU may afford more than the default
        contribution.CHUNK_ELEMENTS = chunk_elements
    model, x, y, graph, dev = _setup(model_name, batch, size, device)
    with torch.no_grad():
        model(x)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    if method == "literal":
        profiling.make_accumulator = LiteralAccumulator  # contributions() builds its accumulators from this name

    def step() -> None:
        if method == "forward":
            with torch.no_grad():
                model(x)
        else:
            profiling.contributions(model, graph, [(x, y)], list(range(10)), device=dev, kernel=kernel)

    median = _median_time(step, repeats, dev)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _peak_bytes()
    return {"model": model_name, "method": method, "batch": batch, "size": size, "device": str(dev),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "repeats": repeats,
            "chunk_elements": contribution.CHUNK_ELEMENTS, "kernel": kernel if method == "profile" else None,
            "median_s": median, "extra_mem_mib": max(0, peak - base) / 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["vgg16_bn", "resnet18"])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/contribution_speed.jsonl"))
    p.add_argument("--chunk-elements", type=int, default=None,
                   help="override modellego.core.contribution.CHUNK_ELEMENTS (the per-step block of the contraction)")
    p.add_argument("--kernel", choices=("torch", "triton"), default="torch",
                   help="contribution kernel of the profile (triton: fused, CUDA only)")
    p.add_argument("--per-layer", action="store_true",
                   help="time each layer's contribution update against its own forward instead (one process)")
    p.add_argument("--layers-out", type=Path, default=Path("benchmarks/results/contribution_layers.jsonl"))
    p.add_argument("--interleaved", action="store_true",
                   help="time forward and profile passes alternately in one process (time only, no memory)")
    p.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.batch, args.size, args.repeats, args.device,
                                 args.chunk_elements, args.kernel)))
        return 0
    if args.per_layer:
        layer_rows = [r for model in args.models
                      for r in run_per_layer(model, args.batch, args.size, args.repeats, args.device, args.kernel)]
        for r in layer_rows:
            record(r, args.layers_out)
        print(f"\n{args.device}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, kernel {args.kernel}")
        _print_per_layer(layer_rows)
        return 0
    if args.interleaved:
        timed = [run_interleaved(model, args.batch, args.size, args.repeats, args.device, args.kernel)
                 for model in args.models]
        for r in timed:
            record(r, args.out)
        print(f"\n{args.device}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
              f"torch {torch.__version__}, kernel {args.kernel}; forward and profile passes alternated")
        print("| model | forward s | profile s | profile / forward (median of pairs) | range of pairs |")
        print("|---|---|---|---|---|")
        for r in timed:
            print(f"| {r['model']} | {r['forward_s']:.3f} | {r['profile_s']:.3f} | {r['ratio']:.2f}x | "
                  f"{min(r['ratios']):.2f}-{max(r['ratios']):.2f}x |")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = {}
    for model in args.models:
        for method in args.methods:
            cmd = [sys.executable, __file__, "--one", model, method, "--batch", str(args.batch), "--size",
                   str(args.size), "--repeats", str(args.repeats), "--device", args.device]
            if args.chunk_elements:
                cmd += ["--chunk-elements", str(args.chunk_elements)]
            cmd += ["--kernel", args.kernel]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{model} {method} failed: {out.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows[model, method] = row
            record(row, args.out)
    chunk = f", blocks of {args.chunk_elements} elements" if args.chunk_elements else ""
    chunk += f", kernel {args.kernel}"
    print(f"\n{args.device}, batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}{chunk}")
    print("| model | forward s | profile s | literal s | profile / forward | literal / profile (time) "
          "| extra MiB profile | extra MiB literal | literal / profile (extra memory) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for model in args.models:
        f, pr, li = (rows.get((model, m)) for m in METHODS)
        if not (f and pr):
            continue
        lit = (f"{li['median_s']:.3f}", f"{li['median_s'] / pr['median_s']:.1f}x", f"{li['extra_mem_mib']:.0f}",
               f"{li['extra_mem_mib'] / max(pr['extra_mem_mib'], 1):.1f}x") if li else ("-",) * 4
        print(f"| {model} | {f['median_s']:.3f} | {pr['median_s']:.3f} | {lit[0]} | "
              f"{pr['median_s'] / f['median_s']:.2f}x | {lit[1]} | {pr['extra_mem_mib']:.0f} | {lit[2]} | {lit[3]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
