"""Time of layer-wise reconstruction (recon) three ways, on real components of the zoo models:
re-running the models up to every layer ("passes"), one batch at a time resuming each model from
checkpoints on disk (what recon does beyond its memory budget), and every batch's values held
between layers (the frontier, within the budget).

All three must give the very same weights (checked here, bit for bit); only the time and the
memory differ. The last two columns time whole calibrations: the default at the paper's
thresholds (``bn+refit+balance``) and ``recon+balance``. The component is cut from a profile of the first `--profile-images` training
images (the cut's quality does not matter here), and refitted on 2,000 training images of the task,
as Table 1 does.

    python benchmarks/recon_speed.py                                   # every cached zoo model, MNIST 0-2
    python benchmarks/recon_speed.py --models googlenet --data fashion-mnist --task 3-9

Rows go to benchmarks/results/recon_speed.jsonl.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
import unittest.mock
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO, checkpoint_path, get_model  # noqa: E402

import modellego  # noqa: E402
import modellego.calibration.reconstruct as recon_module  # noqa: E402
from modellego.calibration.calibrate import calibrate  # noqa: E402
from modellego.calibration.reconstruct import execution_order, reconstruct  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, model_transform  # noqa: E402
from modellego.io.info import get_info  # noqa: E402


def run(model_name: str, data: str, spec: str, args: argparse.Namespace) -> dict:
    model = get_model(args.cache, model_name, data).eval()
    ds = load_dataset(data)
    task = parse_classes(spec, ds.classes)
    train = batches(ds.train, 256, transform=model_transform(model, ds))
    first = itertools.islice(train, -(-args.profile_images // 256))
    cut = modellego.disassemble(model, task, profile=modellego.profile(model, first))
    plan = get_info(cut).pruning
    calib = calibration_batches(model, ds, task)
    xs = [x[torch.isin(y, torch.tensor(task))] for x, y in calib]
    row = {"model": model_name, "data": data, "task": spec, "images": sum(len(x) for x in xs),
           "layers": len(execution_order(cut, xs[0])), "threads": torch.get_num_threads(), "torch": torch.__version__}
    weights = {}
    for setting, budget in (("passes", 0), ("checkpoints", 0), ("frontier", None)):  # None: the default budget
        comp = copy.deepcopy(cut)
        serve = (lambda *a: []) if setting == "passes" else recon_module.servable_layers  # passes: no layer served
        with unittest.mock.patch.object(recon_module, "servable_layers", serve):
            t = time.perf_counter()
            reconstruct(comp, model, plan, xs, memory_budget=budget)
            row[f"{setting}_s"] = round(time.perf_counter() - t, 2)
        weights[setting] = comp.state_dict()
    row["identical"] = all(torch.equal(weights["passes"][k], v) and torch.equal(weights["checkpoints"][k], v)
                           for k, v in weights["frontier"].items())
    row["speedup"] = round(row["passes_s"] / row["frontier_s"], 2)
    row["checkpoint_speedup"] = round(row["passes_s"] / row["checkpoints_s"], 2)
    # What recon costs next to the default calibration at the paper's thresholds, both whole.
    for method in ("bn+refit+balance", "recon+balance"):
        t = time.perf_counter()
        calibrate(copy.deepcopy(cut), model, task, calib, method, plan=plan)
        row[f"{method}_s"] = round(time.perf_counter() - t, 2)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ZOO))
    p.add_argument("--data", default="mnist")
    p.add_argument("--task", default="0-2")
    p.add_argument("--profile-images", type=int, default=5000)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/recon_speed.jsonl"))
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        if not checkpoint_path(args.cache, name, args.data).exists():
            print(f"skipping {name}: no cached checkpoint (run benchmarks/train_zoo.py)", file=sys.stderr)
            continue
        row = run(name, args.data, args.task, args)
        record(row, args.out)
        rows.append(row)
    print("| model | data | task | layers | images | re-running per layer s | checkpoints s | speed-up | frontier s "
          "| speed-up | identical weights | bn+refit+balance s | recon+balance s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['data']} | {r['task']} | {r['layers']} | {r['images']} | {r['passes_s']} "
              f"| {r['checkpoints_s']} | {r['checkpoint_speedup']}x "
              f"| {r['frontier_s']} | {r['speedup']}x | {'yes' if r['identical'] else 'NO'} "
              f"| {r['bn+refit+balance_s']} | {r['recon+balance_s']} |")
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
