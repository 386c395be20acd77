"""Table 2 of the paper on MNIST + Fashion-MNIST: assembling components of two source models.

For each architecture, one source trained on MNIST and one on Fashion-MNIST (cached by
train_zoo.py); for each pair of tasks: Base (class-count-weighted mean of the sources' Base),
Score1 without training with no scaling, the paper's scaling, our calibrated and density heads,
Score2 after a short fine-tuning, and parameters, FLOPs and latency of the padded vs the parallel
assembly. Components are calibrated as cut (``--calibrate``, the library's default otherwise).

    python benchmarks/table2.py                            # every cached architecture
    python benchmarks/table2.py --models lenet5 --finetune-epochs 2 --finetune-images 5000

Rows are appended to benchmarks/results/table2.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO, checkpoint_path  # noqa: E402

import modellego  # noqa: E402
from modellego.assembly.assemble import assemble  # noqa: E402
from modellego.assembly.scaling import SCALINGS, scale_assembly  # noqa: E402
from modellego.calibration.calibrate import DEFAULT_CALIBRATION  # noqa: E402
from modellego.data import Dataset, Split, batches, load_dataset  # noqa: E402
from modellego.data.union import union_dataset  # noqa: E402
from modellego.evaluation.metrics import count_flops, count_params, measure_latency  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, model_transform, scaling_batches, test_accuracy  # noqa: E402
from modellego.io.info import get_info  # noqa: E402
from modellego.training.fit import finetune  # noqa: E402

PAIRS = {"0+0": ([0], [0]), "0-2+0-2": ([0, 1, 2], [0, 1, 2]), "3-9+3-9": (list(range(3, 10)), list(range(3, 10))),
         "0-4+5-9": ([0, 1, 2, 3, 4], [5, 6, 7, 8, 9]), "0-9+0-9": (list(range(10)), list(range(10)))}


def random_subset(ds: Dataset, images: int, seed: int = 0) -> Dataset:
    """`ds` with a seeded random `images` of its training images (validation and test kept whole)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(ds.train), generator=g)[:images]
    return type(ds)(ds.name, ds.classes, Split(ds.train.images[idx], ds.train.labels[idx]), ds.val, ds.test,
                    ds.mean, ds.std)


def score2(asm: torch.nn.Module, union: Dataset, fit_images, epochs: int, images: int) -> dict[str, object]:
    """Score2: a copy of the assembly with its heads unscaled, fine-tuned on `images` seeded union images."""
    tuned = copy.deepcopy(asm)
    scale_assembly(tuned, fit_images, "none")
    small = random_subset(union, images)
    t = time.perf_counter()
    finetune(tuned, small, epochs=epochs, progress=False)
    return {"score2": round(test_accuracy(tuned, union).mean_per_class, 2),
            "finetune": f"{epochs} epochs x {len(small.train)} images, {time.perf_counter() - t:.0f} s",
            "score2_s": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lenet5", "vgg16_bn", "resnet18", "googlenet"])
    p.add_argument("--pairs", nargs="*", default=list(PAIRS))
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--calibrate", default=DEFAULT_CALIBRATION,
                   help=f"how each component is calibrated when cut (default {DEFAULT_CALIBRATION})")
    p.add_argument("--finetune-epochs", type=int, default=2)
    p.add_argument("--finetune-images", type=int, default=5000, help="random union training images used to fine-tune")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/table2.jsonl"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"mnist": load_dataset("mnist"), "fashion-mnist": load_dataset("fashion-mnist")}
    rows = []
    for arch in args.models:
        paths = {d: checkpoint_path(args.cache, arch, d) for d in data}
        if not all(p.exists() for p in paths.values()):
            print(f"skipping {arch}: run benchmarks/train_zoo.py --models {arch} first", file=sys.stderr)
            continue
        sources = {d: modellego.load(paths[d]).to(device) for d in data}
        t = time.perf_counter()
        profiles = {d: modellego.profile(m, batches(data[d].train, 256, transform=model_transform(m, data[d])))
                    for d, m in sources.items()}
        profile_s = time.perf_counter() - t
        for name in args.pairs:
            tasks = dict(zip(data, PAIRS[name]))
            comps, base_sum = [], 0.0
            for d, task in tasks.items():
                m, ds = sources[d], data[d]
                comps.append(modellego.disassemble(m, task, profile=profiles[d], calibrate=args.calibrate,
                                                   calibration=calibration_batches(m, ds, task)))
                base_sum += test_accuracy(m, ds, task).mean_per_class * len(task)
            n = sum(len(t) for t in tasks.values())
            row = {"model": arch, "width": ZOO[arch]["width"], "pair": name, "base": round(base_sum / n, 2),
                   "calibration": args.calibrate, "profile_s": round(profile_s, 1), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "device": str(device)}
            for mode in ("padded", "parallel"):
                asm = assemble(comps, mode=mode)
                shape = (get_info(asm).input.channels, *get_info(asm).input.size)
                row[f"{mode}_params"] = count_params(asm)
                row[f"{mode}_flops"] = count_flops(asm, shape)
                row[f"{mode}_latency_ms"] = round(measure_latency(asm, shape, batch=64, repeats=10), 2)
            asm = assemble(comps, mode="padded")
            union = union_dataset(asm, data)
            fit_images = scaling_batches(asm, union)
            for method in SCALINGS:
                scale_assembly(asm, fit_images, method)
                acc = test_accuracy(asm, union)
                row[f"score1_{method}"] = round(acc.mean_per_class, 2)
                row[f"worst_{method}"] = round(acc.worst_class, 2)
            # The density head scores every layer of every component: what it adds to a forward pass.
            shape = (get_info(asm).input.channels, *get_info(asm).input.size)
            row["padded_density_latency_ms"] = round(measure_latency(asm, shape, batch=64, repeats=10), 2)
            if args.finetune_epochs:
                row.update(score2(asm, union, fit_images, args.finetune_epochs, args.finetune_images))
            rows.append(row)
            record(row, args.out)
    print("| model | tasks | Base | Score1 none | Score1 paper | Score1 calibrated | Score1 density | Score2 "
          "| padded MFLOPs | parallel MFLOPs | padded params | parallel params | padded ms | parallel ms | padded + density ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} w{r['width']} | {r['pair']} | {r['base']} | {r['score1_none']} | {r['score1_paper']} | "
              f"{r['score1_calibrated']} | **{r['score1_density']}** | {r.get('score2', '-')} | {r['padded_flops'] / 1e6:.1f} | "
              f"{r['parallel_flops'] / 1e6:.1f} | {r['padded_params']:,} | {r['parallel_params']:,} | "
              f"{r['padded_latency_ms']} | {r['parallel_latency_ms']} | {r['padded_density_latency_ms']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
