"""What the equal-counts rule of grouped convolutions costs: channels and FLOPs kept with and without it.

A grouped convolution stays one only if every group it keeps keeps the same numbers of inputs and
outputs, so `keep_channels` tops the groups up to the largest count (`modellego.core.locate`). On
the timm models trained by ``table1_timm.py`` (cached), this profiles the training split once and,
per task, counts the channels and the FLOPs of the paper's cut as located (the union of what the
task's layers read, before the rule) and as cut (after it). The "before" cut is not a valid module
(its groups are unequal); it only measures what the rule adds. Rows: one per (model, data, task)
in ``benchmarks/results/group_rule.jsonl``.

    python benchmarks/group_rule.py --model regnetx_002 --data mnist fashion-mnist --epochs 3 --lr 0.02
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from table1_timm import get_model, training_arguments, vision_models  # noqa: E402  (the tests' import of timm, as table1_timm uses it)

import modellego  # noqa: E402
import modellego.core.locate as locate  # noqa: E402
from modellego.core.graph import trace  # noqa: E402
from modellego.cut.budget import output_positions, plan_flops  # noqa: E402
from modellego.cut.prune import build_plan, full_plan  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.data.tasks import parse_classes  # noqa: E402
from modellego.evaluation.protocol import model_transform  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(p, model="regnetx_002", epochs=3, lr=0.02)  # the model table1_timm.py trained
    p.add_argument("--data", nargs="*", default=["mnist"])
    p.add_argument("--tasks", nargs="*", default=["0-2", "3-9"])
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/group_rule.jsonl"))
    args = p.parse_args(argv)
    logging.getLogger("modellego").setLevel(logging.ERROR)
    timm = vision_models.load("timm")
    if timm is None:
        print("timm is needed: pip install \"torch==2.13.0\" timm", file=sys.stderr)
        return 2
    print("| model | data | task | channels located | channels cut | FLOPs located % | FLOPs cut % |\n|---|---|---|---|---|---|---|")
    for data in args.data:
        model = get_model(timm, args.model, data, args)
        ds = load_dataset(data)
        prof = modellego.profile(model, batches(ds.train, 256, transform=model_transform(model, ds)))
        x = torch.zeros(1, ds.in_channels, *ds.image_size)
        graph = trace(model, x)
        positions = output_positions(model, graph, x)
        full = plan_flops(model, full_plan(graph), positions)
        rule = locate.equal_groups
        for spec in args.tasks:
            task = parse_classes(spec, ds.classes)
            counts = {}
            for when, fn in (("located", lambda *a, **k: None), ("cut", rule)):
                locate.equal_groups = fn  # the rule off, then on
                try:
                    keep = locate.keep_channels(graph, prof.task_in_masks(task), task, warn=False)
                finally:
                    locate.equal_groups = rule
                counts[when] = (sum(len(v) for v in keep.values()),
                                100 * plan_flops(model, build_plan(graph, keep), positions) / full)
            row = {"model": args.model, "data": data, "task": spec, "channels": sum(graph.space_size[s] for s in keep),
                   "channels_located": counts["located"][0], "channels_cut": counts["cut"][0],
                   "flops_located_pct": round(counts["located"][1], 2), "flops_cut_pct": round(counts["cut"][1], 2),
                   "torch": torch.__version__}
            record(row, args.out, echo=False)
            print(f"| {args.model} | {data} | {spec} | {row['channels_located']:,} | {row['channels_cut']:,} of "
                  f"{row['channels']:,} | {row['flops_located_pct']:.1f} | {row['flops_cut_pct']:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
