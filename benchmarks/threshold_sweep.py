"""How thresholds trade a component's FLOPs against its accuracy (faithful and calibrated).

    python benchmarks/threshold_sweep.py --model vgg16_bn --data mnist --task 0-2

Rows go to benchmarks/results/threshold_sweep.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import get_model  # noqa: E402

import modellego  # noqa: E402
from modellego.core.locate import Thresholds  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, compare, model_transform  # noqa: E402

GRID = [(0.3, 0.2, 0.4, 0.3), (0.3, 0.4, 0.4, 0.3), (0.5, 0.5, 0.5, 0.5), (0.6, 0.7, 0.6, 0.7), (0.7, 0.9, 0.7, 0.9)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vgg16_bn")
    p.add_argument("--data", default="mnist")
    p.add_argument("--task", default="0-2")
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/threshold_sweep.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(args.data)
    model = get_model(args.cache, args.model, args.data)
    task = parse_classes(args.task, ds.classes)
    sel = modellego.select_samples(model, batches(ds.train, 256, transform=model_transform(model, ds)))
    cal = calibration_batches(model, ds, task)
    rows = []
    for ca, cb, la, lb in GRID:
        t = time.perf_counter()
        prof = modellego.profile(model, sel.batches(128), thresholds=Thresholds(ca, cb, la, lb), select=False,
                                 classes=task)
        seconds = time.perf_counter() - t
        faithful = compare(model, modellego.disassemble(model, task, profile=prof), ds).row()
        calibrated = compare(model, modellego.disassemble(model, task, profile=prof, calibration=cal), ds).row()
        row = {"model": args.model, "data": args.data, "task": args.task, "conv_alpha": ca, "conv_beta": cb,
               "linear_alpha": la, "linear_beta": lb, "masked_base": faithful["masked_base"],
               "disa_paper": faithful["disa"], "worst_paper": faithful["worst_disa"],
               "disa_calibrated": calibrated["disa"], "worst_calibrated": calibrated["worst_disa"],
               "params_pct": faithful["params_pct"], "flops_pct": faithful["flops_pct"],
               "profile_s": round(seconds, 1), "torch": torch.__version__}
        rows.append(row)
        record(row, args.out)
    print("| conv α, β | linear α, β | Masked-Base | Disa (paper) | Disa (calibrated) | params % | FLOPs % |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['conv_alpha']}, {r['conv_beta']} | {r['linear_alpha']}, {r['linear_beta']} | {r['masked_base']} | "
              f"{r['disa_paper']} [{r['worst_paper']}] | {r['disa_calibrated']} [{r['worst_calibrated']}] | "
              f"{r['params_pct']} | {r['flops_pct']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
