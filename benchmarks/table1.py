"""Table 1: disassembly of the zoo models on MNIST and Fashion-MNIST, faithful cut vs calibrated.

For every (model, dataset) the cached checkpoint of ``train_zoo.py`` is profiled once on the
TRAINING split (top 1% correctly classified samples per class), then for each task the component
is cut twice from that profile:

- Disa (paper): the faithful cut, ``disassemble(model, task, profile=prof)``;
- Disa (calibrated): the same cut with a last-layer calibration (``calibrate="bn+refit+balance"``,
  ``calibration=calibration_batches(model, ds, task)``: 2,000 training images of the task);
- Disa (recon): the same cut with every layer refitted to the source's kept outputs by least
  squares, then class-balanced (``recon+balance``, the library's default; multi-class tasks only);
- Disa @ budget: the channels located under a FLOPs budget (``flops=0.5`` by default: every layer
  keeps the same share of its inputs most relevant to the task's classes together, or with
  ``--budget-rank class`` a share per class and their union), then ``recon+balance`` (multi-class
  tasks only).

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
    python benchmarks/table1.py --budget 0.3 --no-recon          # another budget, no recon column

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
from train_zoo import DATA, ZOO, checkpoint_path, get_model  # noqa: E402

import modellego  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.metrics import count_flops, count_params  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, compare, model_transform, test_accuracy  # noqa: E402
from modellego.io.info import get_info  # noqa: E402

LAST_LAYER = "bn+refit+balance"  # the "calibrated" column: BatchNorm statistics and the last layer only
RECON = "recon+balance"  # the recon and budget columns (the library's default)

TASKS = ["0", "1", "0-2", "3-9"]


def _r(x: float) -> float:
    return round(float(x), 2)


def run_model(model_name: str, data: str, tasks: list[str], args: argparse.Namespace) -> list[dict]:
    t_all = time.perf_counter()
    model = get_model(args.cache, model_name, data).eval()
    rows = run_source(model, model_name, ZOO[model_name]["width"], data, tasks, args)
    print(f"{model_name} {data}: done in {time.perf_counter() - t_all:.1f}s", file=sys.stderr, flush=True)
    return rows


def run_source(model: torch.nn.Module, model_name: str, width: float, data: str, tasks: list[str],
               args: argparse.Namespace, *, tags: dict | None = None) -> list[dict]:
    """The Table 1 rows of one trained source model (any traceable classifier); `tags` are added to every row."""
    ds = load_dataset(data)
    prov = model.modellego_info.provenance if getattr(model, "modellego_info", None) else {}
    device = next(model.parameters()).device

    t = time.perf_counter()
    train_it = batches(ds.train, args.batch, transform=model_transform(model, ds), device=device)
    prof = modellego.profile(model, train_it, keep_contributions=True)
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
        calibrated = modellego.disassemble(model, task, profile=prof, calibration=calib, calibrate=LAST_LAYER)
        calibrated_s = time.perf_counter() - t
        cal_acc = test_accuracy(calibrated, ds, task)
        cal_params = sum(p.numel() for p in calibrated.parameters())
        faithful_params = sum(p.numel() for p in faithful.parameters())

        extra = _recon_and_budget(model, prof, ds, task, calib, args) if len(task) > 1 else {}
        r = report.row()
        row = {
            "model": model_name, "width": width, "data": data, "task": spec, "classes": task, **(tags or {}),
            "source_test_accuracy": _r(prov["test_accuracy"]) if "test_accuracy" in prov else None,
            "base": r["base"], "masked_base": r["masked_base"],
            "disa_paper": r["disa"], "disa_calibrated": _r(cal_acc.mean_per_class),
            "worst_base": _r(report.base.worst_class), "worst_masked_base": r["worst_masked_base"],
            "worst_disa_paper": r["worst_disa"], "worst_disa_calibrated": _r(cal_acc.worst_class),
            "per_class_disa_paper": {str(k): _r(v) for k, v in report.disa.per_class.items()},
            "per_class_disa_calibrated": {str(k): _r(v) for k, v in cal_acc.per_class.items()},
            "params_pct": r["params_pct"], "flops_pct": r["flops_pct"],
            "same_size": cal_params == faithful_params,
            "calibration": LAST_LAYER, "calibration_images": sum(len(y) for _, y in calib),
            "profile_s": round(profile_s, 2), "profile_split_s": prof.provenance["seconds"],
            "profile_samples": prof.provenance["selection"].get("selected"),
            "disassemble_s": round(faithful_s, 3), "calibrated_disassemble_s": round(calibrated_s, 3),
            "eval_s": round(eval_s, 2), **extra,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "device": str(device),
        }
        rows.append(row)
        record(row, args.out)
    return rows


def _recon_and_budget(model, prof, ds, task: list[int], calib, args: argparse.Namespace) -> dict:
    """The recon column (paper thresholds) and the FLOPs-budget columns of one multi-class task."""
    out: dict = {}
    shape = prof.provenance["input_shape"]
    if args.recon:
        t = time.perf_counter()
        comp = modellego.disassemble(model, task, profile=prof, calibration=calib, calibrate=RECON)
        acc = test_accuracy(comp, ds, task)
        out |= {"disa_recon": _r(acc.mean_per_class), "worst_disa_recon": _r(acc.worst_class),
                "recon_disassemble_s": round(time.perf_counter() - t, 2)}
    if args.budget:
        t = time.perf_counter()
        comp = modellego.disassemble(model, task, profile=prof, calibration=calib, calibrate=RECON,
                                     flops=args.budget, budget_rank=args.budget_rank)
        seconds = time.perf_counter() - t
        acc = test_accuracy(comp, ds, task)
        budget = get_info(comp).provenance["flops_budget"]
        out |= {"budget": args.budget, "disa_budget": _r(acc.mean_per_class), "worst_disa_budget": _r(acc.worst_class),
                "budget_flops_pct": _r(100 * count_flops(comp, shape) / count_flops(model, shape)),
                "budget_params_pct": _r(100 * count_params(comp) / count_params(model)),
                "budget_keep_fraction": budget["keep_fraction"], "budget_rank": budget["rank"],
                "budget_disassemble_s": round(seconds, 2)}
    return out


def _cell(r: dict, key: str) -> str:
    return f"{r[key]:.2f} ({r['worst_' + key]:.1f})" if key in r else "-"


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"\n{rows[0]['device']}, {rows[0]['threads']} threads, torch {rows[0]['torch']}; "
          "accuracies: mean per-class % on the task's test images (worst class in brackets)")
    print("| model | data | task | Base | Masked-Base | Disa (paper) | Disa (calibrated) | Disa (recon) | params % "
          "| FLOPs % | Disa @ budget | params % | FLOPs % | profile s | disassemble s (paper / calibrated / recon / "
          "budget) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        seconds = " / ".join(f"{r[k]:.1f}" if k in r else "-" for k in (
            "disassemble_s", "calibrated_disassemble_s", "recon_disassemble_s", "budget_disassemble_s"))
        print(f"| {r['model']} | {r['data']} | {r['task']} | {r['base']:.2f} ({r['worst_base']:.1f}) | "
              f"{_cell(r, 'masked_base')} | {_cell(r, 'disa_paper')} | {_cell(r, 'disa_calibrated')} | "
              f"{_cell(r, 'disa_recon')} | {r['params_pct']:.2f} | {r['flops_pct']:.2f} | {_cell(r, 'disa_budget')} | "
              f"{r.get('budget_params_pct', '-')} | {r.get('budget_flops_pct', '-')} | {r['profile_s']:.1f} | "
              f"{seconds} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    p.add_argument("--data", nargs="*", default=DATA, choices=DATA)
    p.add_argument("--tasks", nargs="*", default=TASKS, help="class lists, e.g. 0 1 0-2 3-9 (default)")
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--train", action="store_true", help="train checkpoints missing from the cache")
    p.add_argument("--batch", type=int, default=256, help="batch size of the profiling pass over the training set")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs budget of the budget column (0: no such column)")
    p.add_argument("--budget-rank", choices=("task", "class"), default="task",
                   help="how the task's classes share each layer under the budget (see modellego.cut.budget.RANKS)")
    p.add_argument("--no-recon", dest="recon", action="store_false", help="skip the recon column")
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
