"""Table 1: disassembly of the zoo models on MNIST and Fashion-MNIST, faithful cut vs calibrated.

For every (model, dataset) the cached checkpoint of ``train_zoo.py`` is profiled once on the
TRAINING split (top 1% correctly classified samples per class), then for each task the component
is cut twice from that profile:

- Disa (paper): the faithful cut, ``disassemble(model, task, profile=prof)``;
- Disa (calibrated): the same cut plus the training-free logit calibration
  (``calibration=calibration_batches(model, ds, task)``: 2,000 training images of the task).

Accuracies are the paper's mean per-class accuracy (%) on the test images of the task's classes:
Base (source, argmax over all classes), Masked-Base (source, argmax over the task's classes: the
fair baseline) and the two components; "worst" is the lowest per-class accuracy (a collapsed class
shows there). Params % and FLOPs % are the component's share of the source (both variants have
the same architecture). Results: one JSON row per (model, data, task) appended to
``benchmarks/results/table1.jsonl`` and a Markdown table on stdout.

    python benchmarks/table1.py                                  # every cached zoo model, both datasets
    python benchmarks/table1.py --models lenet5 --data mnist     # a subset (re-runnable)
    python benchmarks/table1.py --models resnet18 --tasks 0-2 3-9
    python benchmarks/table1.py --models googlenet --train       # train missing checkpoints first

Models whose checkpoint is not in the cache are skipped with a message unless ``--train`` is given.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402

import modellego  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.protocol import calibration_batches, compare, model_transform, test_accuracy  # noqa: E402
from modellego.tasks import parse_classes  # noqa: E402
from train_zoo import DATA, ZOO, checkpoint_path, get_model  # noqa: E402

TASKS = ["0", "1", "0-2", "3-9"]


def _r(x: float) -> float:
    return round(float(x), 2)


def run_model(model_name: str, data: str, tasks: list[str], args: argparse.Namespace) -> list[dict]:
    t_all = time.perf_counter()
    model = get_model(args.cache, model_name, data).eval()
    ds = load_dataset(data)
    prov = model.modellego_info.provenance if getattr(model, "modellego_info", None) else {}
    device = next(model.parameters()).device

    t = time.perf_counter()
    train_it = batches(ds.train, args.batch, transform=model_transform(model, ds), device=device)
    prof = modellego.profile(model, train_it)
    profile_s = time.perf_counter() - t
    print(f"{model_name} {data}: profiled in {profile_s:.1f}s {prof.provenance['seconds']}", file=sys.stderr,
          flush=True)

    rows = []
    for spec in tasks:
        task = parse_classes(spec, ds.classes)
        t = time.perf_counter()
        faithful = modellego.disassemble(model, task, profile=prof)
        faithful_s = time.perf_counter() - t
        t = time.perf_counter()
        report = compare(model, faithful, ds)
        eval_s = time.perf_counter() - t

        t = time.perf_counter()
        calib = calibration_batches(model, ds, task, images=args.calibration_images)
        calibrated = modellego.disassemble(model, task, profile=prof, calibration=calib)
        calibrated_s = time.perf_counter() - t
        cal_acc = test_accuracy(calibrated, ds, task)
        cal_params = sum(p.numel() for p in calibrated.parameters())
        faithful_params = sum(p.numel() for p in faithful.parameters())

        r = report.row()
        row = {
            "model": model_name, "width": ZOO[model_name]["width"], "data": data, "task": spec, "classes": task,
            "source_test_accuracy": _r(prov["test_accuracy"]) if "test_accuracy" in prov else None,
            "base": r["base"], "masked_base": r["masked_base"],
            "disa_paper": r["disa"], "disa_calibrated": _r(cal_acc.mean_per_class),
            "worst_base": _r(report.base.worst_class), "worst_masked_base": r["worst_masked_base"],
            "worst_disa_paper": r["worst_disa"], "worst_disa_calibrated": _r(cal_acc.worst_class),
            "per_class_disa_paper": {str(k): _r(v) for k, v in report.disa.per_class.items()},
            "per_class_disa_calibrated": {str(k): _r(v) for k, v in cal_acc.per_class.items()},
            "params_pct": r["params_pct"], "flops_pct": r["flops_pct"],
            "same_size": cal_params == faithful_params,
            "calibration": "bn+refit+balance", "calibration_images": sum(len(y) for _, y in calib),
            "profile_s": round(profile_s, 2), "profile_split_s": prof.provenance["seconds"],
            "profile_samples": prof.provenance["selection"].get("selected"),
            "disassemble_s": round(faithful_s, 3), "calibrated_disassemble_s": round(calibrated_s, 3),
            "eval_s": round(eval_s, 2),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
        }
        rows.append(row)
        record(row, args.out)
    print(f"{model_name} {data}: done in {time.perf_counter() - t_all:.1f}s", file=sys.stderr, flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{rows[0]['device']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}; "
          "accuracies: mean per-class % on the task's test images (worst class in brackets)")
    print("| model | data | task | Base | Masked-Base | Disa (paper) | Disa (calibrated) | params % | FLOPs % "
          "| profile s | disassemble s (paper / calibrated) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['data']} | {r['task']} | {r['base']:.2f} ({r['worst_base']:.1f}) | "
              f"{r['masked_base']:.2f} ({r['worst_masked_base']:.1f}) | "
              f"{r['disa_paper']:.2f} ({r['worst_disa_paper']:.1f}) | "
              f"{r['disa_calibrated']:.2f} ({r['worst_disa_calibrated']:.1f}) | "
              f"{r['params_pct']:.2f} | {r['flops_pct']:.2f} | {r['profile_s']:.1f} | "
              f"{r['disassemble_s']:.2f} / {r['calibrated_disassemble_s']:.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    p.add_argument("--data", nargs="*", default=DATA, choices=DATA)
    p.add_argument("--tasks", nargs="*", default=TASKS, help="class lists, e.g. 0 1 0-2 3-9 (default)")
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--train", action="store_true", help="train checkpoints missing from the cache")
    p.add_argument("--batch", type=int, default=256, help="batch size of the profiling pass over the training set")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/table1.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for model in args.models:
        for data in args.data:
            if not args.train and not checkpoint_path(args.cache, model, data).exists():
                print(f"skipping {model} {data}: no checkpoint {checkpoint_path(args.cache, model, data)} "
                      "(run benchmarks/train_zoo.py or pass --train)", file=sys.stderr, flush=True)
                continue
            rows += run_model(model, data, args.tasks, args)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
