"""Where the union of per-class shares ("class") beats the joint ranking ("task") under a budget: why?

For each task and each seeded draw of calibration images, three components under the same FLOPs
budget, each with ``recon+balance``:

- ``task``: the default, one share f of every layer's inputs, ranked for the classes together;
- ``class``: a share per class, then their union (uneven across layers: larger where the classes
  disagree);
- ``layers``: a diagnostic, not a library option. At every layer it keeps exactly as many inputs
  as the union keeps there at the same f, but ranked for the classes together. If it matches
  "class", the union wins by how it spreads the budget across layers; if it matches "task", by
  which channels it keeps.

    python benchmarks/budget_rank.py --jobs googlenet:mnist:3-9 --seeds 0 1 2

With ``--held-out F``, a fraction F of each draw's calibration images is set aside: "task" and
"class" are fitted on the rest, and their accuracy on the held-out training images is recorded
next to their test accuracy. That measures whether a choice made on training images alone would
pick the rule that wins on the test set.

    python benchmarks/budget_rank.py --held-out 0.25 --jobs vgg16_bn:mnist:0-2 googlenet:mnist:3-9

Rows go to benchmarks/results/budget_rank.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import ZOO, get_model  # noqa: E402

import modellego  # noqa: E402
import modellego.core.locate as locate  # noqa: E402
import modellego.cut.budget as budget  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.metrics import accuracy  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, model_transform, test_accuracy  # noqa: E402
from modellego.io.info import get_info  # noqa: E402

RULES = ("task", "class", "layers")


def _union_counts_locate(graph, contributions, cls, thresholds, keep_fraction=None):
    """`locate_class` for the "layers" rule: the joint ranking with the union's count per layer."""
    if keep_fraction is None or isinstance(cls, int) or len(cls) == 1:
        return locate.locate_class(graph, contributions, cls, thresholds, keep_fraction)
    union = budget.locate_union(graph, contributions, cls, thresholds, keep_fraction)
    counts = {k: int(v.sum()) for k, v in union.items()}
    share = locate.relevant_inputs

    def fixed_count(layer, r, out_mask, th, keep_fraction=None):
        # ceil((n - 0.5) / P · P) = n: the union's count at this layer
        return share(layer, r, out_mask, th, (counts[layer.name] - 0.5) / r.shape[-1])

    locate.relevant_inputs = fixed_count  # the one seam: locate_class looks it up at call time
    try:
        return locate.locate_class(graph, contributions, cls, thresholds, keep_fraction)
    finally:
        locate.relevant_inputs = share


def _split(calib: list[tuple], fraction: float, seed: int) -> tuple[list[tuple], list[tuple]]:
    """A seeded split of calibration batches into (fit, held out), as batches of 256."""
    x, y = torch.cat([b[0] for b in calib]), torch.cat([b[1] for b in calib])
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1000 + seed))
    n = int(round(fraction * len(y)))
    held, fit = order[:n], order[n:]
    return [(x[i], y[i]) for i in fit.split(256)], [(x[i], y[i]) for i in held.split(256)]


def _print_choices(rows: list[dict]) -> None:
    """Per draw: held-out and test accuracy of both rules, and the test accuracy of each way to choose."""
    print("\n| model | data | task | draw | held-out task / class | test task / class | chosen | test winner |")
    print("|---|---|---|---|---|---|---|---|")
    draws = dict.fromkeys((r["model"], r["data"], r["task"], r["seed"]) for r in rows)
    picked: dict[str, list[float]] = {"always task": [], "always class": [], "held-out choice": [], "best on test": []}
    for draw in draws:
        got = {r["rule"]: r for r in rows if (r["model"], r["data"], r["task"], r["seed"]) == draw}
        t, c = got["task"], got["class"]
        chosen = "class" if c["held_out_disa"] > t["held_out_disa"] else "task"  # ties: the default
        winner = "tie" if c["disa"] == t["disa"] else "class" if c["disa"] > t["disa"] else "task"
        for way, value in zip(picked, (t["disa"], c["disa"], got[chosen]["disa"], max(t["disa"], c["disa"]))):
            picked[way].append(value)
        print(f"| {' | '.join(map(str, draw))} | {t['held_out_disa']:.2f} / {c['held_out_disa']:.2f} "
              f"| {t['disa']:.2f} / {c['disa']:.2f} | {chosen} | {winner} |")
    print("\n| way to choose | mean test Disa over the draws |\n|---|---|")
    for way, values in picked.items():
        print(f"| {way} | {statistics.mean(values):.2f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", nargs="+", default=["googlenet:mnist:3-9"], help="MODEL:DATA:TASK")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="calibration draws")
    p.add_argument("--flops", type=float, default=0.5)
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--held-out", type=float, default=0.0,
                   help="fraction of calibration images set aside to choose between task and class")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/budget_rank.jsonl"))
    args = p.parse_args(argv)
    rules = ("task", "class") if args.held_out else RULES
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    profiles: dict[tuple[str, str], tuple] = {}  # one profile per model and dataset, shared by their tasks
    for job in args.jobs:
        name, data, spec = job.split(":")
        if (name, data) not in profiles:
            model = get_model(args.cache, name, data).eval()
            ds = load_dataset(data)
            it = batches(ds.train, 256, transform=model_transform(model, ds))
            profiles[name, data] = model, ds, modellego.profile(model, it, keep_contributions=True)
        model, ds, prof = profiles[name, data]
        task = parse_classes(spec, ds.classes)
        for seed in args.seeds:
            calib = calibration_batches(model, ds, task, images=args.calibration_images, seed=seed)
            held = None
            if args.held_out:
                calib, held = _split(calib, args.held_out, seed)
            for rule in rules:
                t = time.perf_counter()
                budget.locate_class = _union_counts_locate if rule == "layers" else locate.locate_class
                try:
                    comp = modellego.disassemble(model, task, profile=prof, calibration=calib,
                                                 calibrate="recon+balance", flops=args.flops,
                                                 budget_rank="class" if rule == "class" else "task")
                finally:
                    budget.locate_class = locate.locate_class
                acc = test_accuracy(comp, ds, task)
                chosen = get_info(comp).provenance["flops_budget"]
                row = {"model": name, "width": ZOO[name]["width"], "data": data, "task": spec, "seed": seed,
                       "rule": rule, "budget": args.flops, "disa": round(acc.mean_per_class, 2),
                       "worst": round(acc.worst_class, 2), "keep_fraction": chosen["keep_fraction"],
                       "flops_ratio": chosen["flops_ratio"], "seconds": round(time.perf_counter() - t, 1),
                       "threads": torch.get_num_threads(), "torch": torch.__version__}
                if held is not None:
                    row |= {"held_out": args.held_out, "held_out_images": sum(len(y) for _, y in held),
                            "held_out_disa": round(accuracy(comp, held, classes=task).mean_per_class, 2)}
                record(row, args.out)
                rows.append(row)
    if args.held_out:
        _print_choices(rows)
        return 0
    print("\n| model | data | task | rule | Disa per draw [worst class] | mean | FLOPs % |")
    print("|---|---|---|---|---|---|---|")
    for job in dict.fromkeys((r["model"], r["data"], r["task"]) for r in rows):
        for rule in RULES:
            got = [r for r in rows if (r["model"], r["data"], r["task"]) == job and r["rule"] == rule]
            cells = ", ".join(f"{r['disa']:.2f} [{r['worst']:.1f}]" for r in got)
            print(f"| {' | '.join(job)} | {rule} | {cells} | {statistics.mean(r['disa'] for r in got):.2f} | "
                  f"{100 * got[0]['flops_ratio']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
