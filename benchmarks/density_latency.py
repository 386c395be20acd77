"""What the density head adds to an assembly's forward pass (latency, batch 64).

For each architecture: components of all ten classes of the MNIST and Fashion-MNIST sources
(cut from a quick profile of 2,000 training images; accuracy does not matter here), padded into one
assembly, timed without a head and with the density head (`scale_assembly(..., "density")`).

    python benchmarks/density_latency.py --models lenet5 vgg16_bn resnet18 googlenet

Rows go to benchmarks/results/density_latency.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO, checkpoint_path  # noqa: E402

import modellego  # noqa: E402
from modellego.assembly.scaling import scale_assembly  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.union import union_dataset  # noqa: E402
from modellego.evaluation.metrics import measure_latency  # noqa: E402
from modellego.evaluation.protocol import model_transform, scaling_batches  # noqa: E402
from modellego.io.info import get_info  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lenet5", "vgg16_bn", "resnet18", "googlenet"])
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/density_latency.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"mnist": load_dataset("mnist"), "fashion-mnist": load_dataset("fashion-mnist")}
    rows = []
    for arch in args.models:
        comps = []
        for name, ds in data.items():
            model = modellego.load(checkpoint_path(args.cache, arch, name))
            quick = list(batches(ds.train.select(torch.arange(2000)), 500, transform=model_transform(model, ds)))
            comps.append(modellego.disassemble(model, list(range(10)), profile=modellego.profile(model, quick, select=False)))
        asm = modellego.assemble(comps, mode="padded")
        shape = (get_info(asm).input.channels, *get_info(asm).input.size)
        plain = measure_latency(asm, shape, batch=64, repeats=10)
        scale_assembly(asm, scaling_batches(asm, union_dataset(asm, data), per_class=30), "density")
        with_density = measure_latency(asm, shape, batch=64, repeats=10)
        row = {"model": arch, "width": ZOO[arch]["width"], "pair": "0-9+0-9", "batch": 64, "padded_ms": round(plain, 2),
               "padded_density_ms": round(with_density, 2), "sites": len(asm.probe.layers),
               "threads": torch.get_num_threads(), "torch": torch.__version__}
        rows.append(row)
        record(row, args.out)
    print("| model | Gaussian sites | padded ms | padded + density ms | overhead |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} w{r['width']} | {r['sites']} | {r['padded_ms']} | {r['padded_density_ms']} | "
              f"{100 * (r['padded_density_ms'] / r['padded_ms'] - 1):+.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
