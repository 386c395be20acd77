"""How a FLOPs budget trades a component's size against its accuracy, for each calibration.

One profile (contributions kept) of a cached zoo model; then, for every budget, the component
located under it (`disassemble(..., flops=budget)`) as cut, with the default last-layer
calibration, and with every layer refitted (``recon+balance``). The paper's thresholds give one
more point per calibration. Accuracy is the mean per-class test accuracy on the task.

    python benchmarks/budget_sweep.py --model vgg16_bn --data mnist --task 0-2

Rows go to benchmarks/results/budget_sweep.jsonl; a Markdown table is printed and a plot
(accuracy against FLOPs %) is saved to benchmarks/results/budget_sweep-MODEL-DATA-TASK.png.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO, get_model  # noqa: E402

import modellego  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.metrics import count_flops, count_params  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, model_transform, test_accuracy  # noqa: E402

BUDGETS = [1.0, 0.7, 0.5, 0.3, 0.2, 0.1, 0.05]
CALIBRATIONS = ["none", "bn+refit+balance", "recon+balance"]  # faithful, last layer, every layer


def plot(rows: list[dict], masked_base: float, title: str):
    """Accuracy against FLOPs %, one line per calibration; the paper's thresholds as stars.

    Left: the whole range; right: the band near Masked-Base where the target lies.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, zoom in zip(axes, (False, True)):
        for i, cal in enumerate(CALIBRATIONS):
            line = sorted((r for r in rows if r["calibration"] == cal and r["budget"] is not None),
                          key=lambda r: r["flops_pct"])
            paper = [r for r in rows if r["calibration"] == cal and r["budget"] is None]
            ax.plot([r["flops_pct"] for r in line], [r["accuracy"] for r in line], "o-", color=f"C{i}", label=cal)
            ax.plot([r["flops_pct"] for r in paper], [r["accuracy"] for r in paper], "*", color=f"C{i}", markersize=14)
        ax.axhline(masked_base, color="grey", linestyle="--", label="Masked-Base")
        ax.axhline(masked_base - 0.5, color="grey", linestyle=":", label="Masked-Base − 0.5")
        ax.set_xlabel("component FLOPs, % of the source (★: the paper's thresholds)")
        ax.set_ylabel("mean per-class test accuracy, %")
        ax.grid(alpha=0.3)
        if zoom:
            ax.set_ylim(masked_base - 5, min(100.5, masked_base + 1.5))
            ax.set_title("near Masked-Base")
        else:
            ax.set_ylim(max(0, min(r["accuracy"] for r in rows) - 2), 100.5)
            ax.set_title(title)
            ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16_bn", choices=list(ZOO))
    p.add_argument("--data", default="mnist")
    p.add_argument("--task", default="0-2")
    p.add_argument("--budgets", nargs="*", type=float, default=BUDGETS)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_sweep.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data)
    model = get_model(args.cache, args.model, args.data).eval()
    task = parse_classes(args.task, ds.classes)
    prof = modellego.profile(model, batches(ds.train, 256, transform=model_transform(model, ds)),
                             keep_contributions=True)
    cal = calibration_batches(model, ds, task)
    shape = prof.provenance["input_shape"]
    full = count_flops(model, shape)
    masked_base = test_accuracy(model, ds, task, restrict=True).mean_per_class
    rows = []
    for budget in [None, *args.budgets]:
        for method in CALIBRATIONS:
            t = time.perf_counter()
            comp = modellego.disassemble(model, task, profile=prof, flops=budget,
                                         calibration=None if method == "none" else cal, calibrate=method)
            seconds = time.perf_counter() - t
            acc = test_accuracy(comp, ds, task)
            row = {"model": args.model, "width": ZOO[args.model]["width"], "data": args.data, "task": args.task,
                   "budget": budget, "calibration": method, "masked_base": round(masked_base, 2),
                   "accuracy": round(acc.mean_per_class, 2), "worst": round(acc.worst_class, 2),
                   "flops_pct": round(100 * count_flops(comp, shape) / full, 2),
                   "params_pct": round(100 * count_params(comp) / count_params(model), 2),
                   "disassemble_s": round(seconds, 2), "threads": torch.get_num_threads(), "torch": torch.__version__}
            rows.append(row)
            record(row, args.out)
    print(f"\n{args.model} (width {ZOO[args.model]['width']:g}) {args.data} task {args.task}: "
          f"Masked-Base {masked_base:.2f}; mean per-class test accuracy % [worst class]")
    print("| budget | FLOPs % | params % | " + " | ".join(CALIBRATIONS) + " |")
    print("|---|---|---|" + "---|" * len(CALIBRATIONS))
    for budget in [None, *args.budgets]:
        mine = [r for r in rows if r["budget"] == budget]
        cells = " | ".join(f"{r['accuracy']:.2f} [{r['worst']:.1f}]" for r in mine)
        label = "paper's thresholds" if budget is None else f"{budget:g}"
        print(f"| {label} | {mine[0]['flops_pct']} | {mine[0]['params_pct']} | {cells} |")
    fig = plot(rows, masked_base, f"{args.model}, width {ZOO[args.model]['width']:g}, {args.data}, task {args.task}")
    path = args.out.parent / f"budget_sweep-{args.model}-{args.data}-{args.task}.png"
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
