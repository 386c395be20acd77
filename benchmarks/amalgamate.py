"""Knowledge amalgamation against MDA's training-free assembly on MNIST + Fashion-MNIST.

The paper's third application: assembled components against a student trained by knowledge
amalgamation (KA, Shen et al. 2019) from two teachers. For each architecture, the two sources of
train_zoo.py (one MNIST, one Fashion-MNIST model) and the pairs of tasks of table2.py, all on the
same union test images:

- Base: the class-count-weighted mean of the sources' Base (table2.py's).
- MDA Score1: the components (calibrated as cut), padded, with the density head; no gradient step.
- MDA Score2: that assembly fine-tuned briefly (table2.py's `score2`, the same budget).
- KA: a student of the sources' architecture and width, trained without labels to match the two
  sources restricted to their task's outputs (`task_teacher`, the Masked-Base teachers).
- distilled assembly: the same student trained from the MDA assembly's outputs (`distill`).

Each with parameters, FLOPs, latency (batch 64) and the wall time to produce it (MDA: cutting,
assembling and fitting the head; the profiles, shared by every pair, are timed apart; the
distilled assembly's time excludes the MDA time it starts from).

    python benchmarks/amalgamate.py                                   # lenet5 and vgg16_bn, every pair
    python benchmarks/amalgamate.py --models lenet5 --pairs 0-4+5-9 --epochs 1 --images 5000

Rows are appended to benchmarks/results/amalgamate.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from table2 import PAIRS, score2  # noqa: E402
from train_zoo import ZOO, get_model  # noqa: E402

import modellego  # noqa: E402
from modellego.apps.amalgamate import amalgamate, distill, task_teacher  # noqa: E402
from modellego.assembly.assemble import assemble  # noqa: E402
from modellego.assembly.scaling import scale_assembly  # noqa: E402
from modellego.calibration.calibrate import DEFAULT_CALIBRATION  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.union import union_dataset  # noqa: E402
from modellego.evaluation.metrics import count_flops, count_params, measure_latency  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, input_shape, model_transform, scaling_batches, test_accuracy  # noqa: E402
from modellego.io.info import get_info  # noqa: E402
from modellego.training.fit import FitConfig  # noqa: E402


def _cost(model: torch.nn.Module, shape: tuple[int, int, int], prefix: str) -> dict[str, float]:
    return {f"{prefix}_params": count_params(model), f"{prefix}_flops": count_flops(model, shape),
            f"{prefix}_latency_ms": round(measure_latency(model, shape, batch=64, repeats=10), 2)}


def _accuracy(model: torch.nn.Module, union, prefix: str) -> dict[str, float]:
    acc = test_accuracy(model, union)
    return {prefix: round(acc.mean_per_class, 2), f"worst_{prefix}": round(acc.worst_class, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lenet5", "vgg16_bn"])
    p.add_argument("--pairs", nargs="*", default=list(PAIRS), choices=list(PAIRS))
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--calibrate", default=DEFAULT_CALIBRATION,
                   help=f"how each component is calibrated when cut (default {DEFAULT_CALIBRATION})")
    p.add_argument("--epochs", type=int, default=None, help="student epochs (default: the source's in train_zoo.py)")
    p.add_argument("--images", type=int, default=None,
                   help="union training images per student (default: the source's train_limit in train_zoo.py)")
    p.add_argument("--lr", type=float, default=0.01, help="student SGD learning rate (default 0.01)")
    p.add_argument("--temperature", type=float, default=4.0)
    p.add_argument("--finetune-epochs", type=int, default=2, help="MDA Score2 fine-tune epochs, as table2.py (0: skip)")
    p.add_argument("--finetune-images", type=int, default=5000, help="random union training images used to fine-tune")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/amalgamate.jsonl"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    data = {"mnist": load_dataset("mnist"), "fashion-mnist": load_dataset("fashion-mnist")}
    rows = []
    for arch in args.models:
        cfg = ZOO[arch]
        sources = {d: get_model(args.cache, arch, d, progress=True).to(device) for d in data}
        t = time.perf_counter()
        profiles = {d: modellego.profile(m, batches(data[d].train, 256, transform=model_transform(m, data[d])))
                    for d, m in sources.items()}
        profile_s = time.perf_counter() - t
        config = FitConfig(epochs=args.epochs or cfg["epochs"], lr=args.lr)
        images = args.images or cfg["train_limit"]
        student_args = dict(config=config, temperature=args.temperature, images=images, device=device, progress=False)
        for name in args.pairs:
            tasks = dict(zip(data, PAIRS[name]))
            n = sum(len(task) for task in tasks.values())
            base = sum(test_accuracy(sources[d], data[d], task).mean_per_class * len(task) for d, task in tasks.items()) / n
            shape = input_shape(sources["mnist"], data["mnist"])
            row = {"model": arch, "width": cfg["width"], "pair": name, "base": round(base, 2),
                   "calibration": args.calibrate, "epochs": config.epochs, "lr": config.lr,
                   "temperature": args.temperature, "student_images": images, "profile_s": round(profile_s, 1),
                   "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(device)}
            for d, m in sources.items():  # Base runs the two sources, one per image's dataset
                for k, v in _cost(m, shape, f"source_{d}").items():
                    row[k] = v
            # MDA: cut, assemble, fit the density head; no gradient step.
            t = time.perf_counter()
            comps = [modellego.disassemble(sources[d], task, profile=profiles[d], calibrate=args.calibrate,
                                           calibration=calibration_batches(sources[d], data[d], task))
                     for d, task in tasks.items()]
            asm = assemble(comps, mode="padded")
            union = union_dataset(asm, data)
            fit_images = scaling_batches(asm, union)
            scale_assembly(asm, fit_images, "density")
            row["mda_s"] = round(time.perf_counter() - t, 1)
            row.update(_accuracy(asm, union, "mda_density"))
            if args.finetune_epochs:  # MDA Score2: table2.py's short fine-tune of the same assembly
                row.update(score2(asm, union, fit_images, args.finetune_epochs, args.finetune_images))
            row.update(_cost(asm, tuple(input_shape(asm, union)), "mda"))
            # KA: a student of the two sources restricted to their tasks, without labels.
            teachers = [task_teacher(sources[d], task) for d, task in tasks.items()]
            t = time.perf_counter()
            ka = amalgamate(teachers, data, **student_args)
            row["ka_s"] = round(time.perf_counter() - t, 1)
            assert get_info(ka).class_names == get_info(asm).class_names  # the same union, in the same order
            row.update(_accuracy(ka, union, "ka"))
            row.update(_cost(ka, tuple(input_shape(ka, union)), "student"))
            row["ka_best_epoch"] = get_info(ka).provenance["amalgamation"]["best_epoch"]
            # The assembly distilled into the same student.
            t = time.perf_counter()
            distilled = distill(asm, data, **student_args)
            row["distill_s"] = round(time.perf_counter() - t, 1)
            row.update(_accuracy(distilled, union, "distilled"))
            rows.append(row)
            record(row, args.out)
    print("| model | tasks | Base | MDA Score1 (density) | MDA Score2 | KA student | distilled assembly | MDA params | student params "
          "| MDA MFLOPs | student MFLOPs | sources ms | MDA ms | student ms | MDA s | KA s | distill s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        sources_ms = round(r["source_mnist_latency_ms"] + r["source_fashion-mnist_latency_ms"], 2)
        print(f"| {r['model']} w{r['width']} | {r['pair']} | {r['base']} | {r['mda_density']} | {r.get('score2', '-')} | {r['ka']} | "
              f"{r['distilled']} | {r['mda_params']:,} | {r['student_params']:,} | {r['mda_flops'] / 1e6:.2f} | "
              f"{r['student_flops'] / 1e6:.2f} | {sources_ms} | {r['mda_latency_ms']} | {r['student_latency_ms']} | "
              f"{r['mda_s']} (+{r['profile_s']} profiles) | {r['ka_s']} | {r['distill_s']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
