"""Model compression at equal FLOPs: modellego's all-class component against Torch-Pruning's criteria.

For each cached source of train_zoo.py and each FLOPs budget, on the same test images:

- modellego: `modellego.apps.compress.compress` (every layer keeps the same share of the inputs most
  relevant to all classes, the largest share that fits), (a) as located, (b) calibrated with
  recon+balance (every layer refitted by least squares to the source's kept features, then a
  bias), (c) (b) fine-tuned for the same short budget as everyone.
- Torch-Pruning 1.6 (pip install "torch==2.13.0" "torch-pruning==1.6.1"): L1 and L2 filter norm,
  FPGM (geometric median), BN-scale (network slimming), Taylor (first-order, gradients of the
  cross-entropy on the calibration images), LAMP, and HRank (mean rank of a channel's feature maps
  on 128 calibration images; written here as a Torch-Pruning importance, as it is not among the
  library's), each with one pruning ratio for every layer (bisected so the FLOPs land at or under
  the budget), and LAMP with a global ratio. The last
  layer is never pruned. (a) as pruned, (b) with the *same* recon+balance calibration on the
  same images (this separates the choice of channels from the refit), (c) (b) fine-tuned.

Torch-Pruning's kept channels are read back as a modellego pruning plan: its pruning history is
replayed on a float64 copy of the source whose weights encode their own (output, input) indices,
and the plan is checked by cutting the source with modellego and comparing every tensor with
Torch-Pruning's model. FLOPs are counted for everyone by `torch.utils.flop_counter`. Seconds are
the time to produce the model from the trained source: for modellego its profile, locating and
calibration; for Torch-Pruning its bisection and pruning, plus the calibration in (b).

    python benchmarks/compress.py --models vgg16_bn --data mnist --budgets 0.5
    python benchmarks/compress.py                      # every cached model, both datasets, 0.7 0.5 0.3

Rows are appended to benchmarks/results/compress.jsonl; a Markdown table is printed.
"""
from __future__ import annotations

import argparse
import copy
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from table2 import random_subset  # noqa: E402
from train_zoo import ZOO, checkpoint_path  # noqa: E402

import modellego  # noqa: E402
from modellego.apps.compress import compress  # noqa: E402
from modellego.calibration.calibrate import DEFAULT_CALIBRATION, calibrate  # noqa: E402
from modellego.core.graph import trace  # noqa: E402
from modellego.core.layers import is_depthwise  # noqa: E402
from modellego.cut.prune import full_plan, prune_layers  # noqa: E402
from modellego.data import batches, load_dataset  # noqa: E402
from modellego.evaluation.metrics import count_flops, count_params, measure_latency  # noqa: E402
from modellego.evaluation.protocol import calibration_batches, input_shape, model_transform, test_accuracy  # noqa: E402
from modellego.io.plan import Plan  # noqa: E402
from modellego.models import classifier_layer  # noqa: E402
from modellego.training.fit import finetune  # noqa: E402

HRANK_IMAGES = 128  # calibration images whose feature-map ranks HRank averages
CODE = 2.0 ** 20  # probe weights hold out_index * CODE + in_index, exact in float64


def feature_ranks(model: nn.Module, images: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
    """HRank's statistic: per convolution, the mean rank over `images` of each input and output channel's map.

    Shape:
        images (B, C, H, W); per layer name, "in" (C_in,) and "out" (C_out,) mean ranks.
    """
    ranks: dict[str, dict[str, torch.Tensor]] = {}
    convs = {mod: name for name, mod in model.named_modules() if isinstance(mod, nn.Conv2d)}

    def rank(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (C,)
        return torch.linalg.matrix_rank(x.detach().double()).double().mean(0)

    def hook(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        ranks[convs[mod]] = {"in": rank(args[0]), "out": rank(out)}

    handles = [mod.register_forward_hook(hook) for mod in convs]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return ranks


def hrank_importance(tp, ranks: dict[str, dict[str, torch.Tensor]]):
    """HRank (Lin et al., CVPR 2020) as a Torch-Pruning importance: a channel scores the mean rank of its
    feature maps, read where the next convolution takes it in (after BatchNorm and activation, as HRank
    hooks them), or at the producing convolution's output when no convolution reads it."""
    fn = tp.pruner.function
    sides = {fn.prune_conv_in_channels: "in", fn.prune_conv_out_channels: "out"}

    class HRankImportance(tp.importance.Importance):
        def __init__(self) -> None:
            self.names: dict[int, str] = {}

        def observe(self, model: nn.Module) -> None:
            """Name the modules of the copy that is pruned (the ranks are keyed by name)."""
            self.names = {id(mod): name for name, mod in model.named_modules()}

        def __call__(self, group) -> torch.Tensor | None:
            found: dict[str, list[tuple[torch.Tensor, list[int]]]] = {"in": [], "out": []}
            for i, (dep, idxs) in enumerate(group):
                layer_ranks = ranks.get(self.names.get(id(dep.target.module), ""))
                side = sides.get(dep.handler)
                if layer_ranks is not None and side is not None:
                    found[side].append((layer_ranks[side][idxs], group[i].root_idxs))
            items = found["in"] or found["out"]
            if not items:
                return None
            total = torch.zeros(len(items[0][0]), dtype=torch.float64)
            for score, root in items:
                total.scatter_add_(0, torch.tensor(root), score)
            return (total / len(items)).float()

    return HRankImportance()


def _criteria(tp, ranks: Callable[[], dict[str, dict[str, torch.Tensor]]]) -> dict[str, tuple[Callable[[], object], bool]]:
    """Torch-Pruning importance per name, and whether its ratio is global; `ranks` gives HRank's statistic."""
    imp = tp.importance
    return {"L1": (lambda: imp.MagnitudeImportance(p=1), False), "L2": (lambda: imp.MagnitudeImportance(p=2), False),
            "FPGM": (lambda: imp.FPGMImportance(p=2), False), "BN-scale": (lambda: imp.BNScaleImportance(), False),
            "Taylor": (lambda: imp.TaylorImportance(), False), "LAMP": (lambda: imp.LAMPImportance(p=2), False),
            "LAMP global": (lambda: imp.LAMPImportance(p=2), True),
            "HRank": (lambda: hrank_importance(tp, ranks()), False)}


def tp_prune(tp, model: nn.Module, example: torch.Tensor, make_importance, global_pruning: bool, ratio: float,
             grads: list[tuple[torch.Tensor, torch.Tensor]] | None):
    """A copy of `model` pruned by Torch-Pruning at `ratio`, and its pruning history."""
    m = copy.deepcopy(model).eval()
    importance = make_importance()
    if hasattr(importance, "observe"):
        importance.observe(m)
    pruner = tp.pruner.MetaPruner(m, example, importance=importance, pruning_ratio=ratio, global_pruning=global_pruning,
                                  ignored_layers=[classifier_layer(m)[1]])
    if grads is not None:  # Taylor: gradients of the loss on the calibration images
        m.zero_grad()
        for x, y in grads:
            F.cross_entropy(m(x), y).backward()
    pruner.step()
    m.zero_grad(set_to_none=True)
    return m, pruner.pruning_history()


def tp_plan(tp, model: nn.Module, example: torch.Tensor, history, plan_keys: Plan) -> Plan:
    """Torch-Pruning's kept channels as a modellego plan: its history replayed on a self-describing copy."""
    probe = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        for name, mod in probe.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)):
                out, per_group = mod.weight.shape[:2]
                o = torch.arange(out, dtype=torch.float64)
                groups = getattr(mod, "groups", 1)
                i = (o // (out // groups) * per_group)[:, None] + torch.arange(per_group, dtype=torch.float64)
                mod.weight.copy_((o[:, None] * CODE + i).view(out, per_group, *[1] * (mod.weight.ndim - 2))
                                 .expand_as(mod.weight))
            elif name in plan_keys and getattr(mod, "weight", None) is not None:  # BatchNorm, PReLU: own index
                mod.weight.copy_(torch.arange(mod.weight.numel(), dtype=torch.float64))
    dg = tp.DependencyGraph().build_dependency(probe, example_inputs=example.double())
    dg.load_pruning_history(history)
    plan: Plan = {}
    modules = dict(probe.named_modules())
    for name, dims in plan_keys.items():
        w = modules[name].weight.detach()
        if "in" not in dims:
            plan[name] = {"out": w.long().tolist()}
            continue
        flat = w.flatten(2)[:, :, 0] if w.ndim > 2 else w  # (O, I)
        out = torch.div(flat[:, 0], CODE, rounding_mode="floor").long().tolist()
        conv = isinstance(modules[name], nn.Conv2d)
        if conv and is_depthwise(modules[name]):
            ins = out
        else:
            ins = torch.remainder(flat[0], CODE).long().tolist()
        plan[name] = {"out": out, "in": ins}
    return plan


def check_plan(source: nn.Module, plan: Plan, pruned: nn.Module) -> nn.Module:
    """modellego's cut of `source` by `plan`, which must equal Torch-Pruning's `pruned` tensor for tensor."""
    ours = prune_layers(copy.deepcopy(source), plan).eval()
    a, b = ours.state_dict(), pruned.state_dict()
    bad = [k for k in a if k not in b or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    if bad or a.keys() != b.keys():
        raise RuntimeError(f"the plan read back from Torch-Pruning does not reproduce its model: {bad[:3]}")
    return ours


def bisect_ratio(prune: Callable[[float], tuple], shape, target: float, full: int, steps: int = 9):
    """The smallest pruning ratio (to 0.95 / 2^steps) whose model fits `target` × the source's FLOPs."""
    lo, hi, best = 0.0, 0.95, None
    for _ in range(steps):
        mid = (lo + hi) / 2
        got = prune(mid)
        if count_flops(got[0], shape) / full <= target:
            hi, best = mid, (mid, got)
        else:
            lo = mid
    if best is None:
        got = prune(hi)
        best = (hi, got)
    return best


def _measure(model: nn.Module, source: nn.Module, ds, shape) -> dict[str, float]:
    return {"params": count_params(model), "flops": count_flops(model, shape),
            "flops_ratio": round(count_flops(model, shape) / count_flops(source, shape), 4),
            "latency_ms": round(measure_latency(model, shape, batch=64, repeats=10), 2)}


def run_source(args: argparse.Namespace, tp, arch: str, data: str, source: nn.Module, ds) -> list[dict]:
    """Every budget and method on one trained source; rows recorded as they come."""
    criteria = _criteria(tp, functools.cache(lambda: feature_ranks(source, calib[0][0][:HRANK_IMAGES])))
    rows: list[dict] = []
    shape = input_shape(source, ds)
    classes = list(range(len(ds.classes)))
    calib = calibration_batches(source, ds, classes, images=args.calibration_images)
    tune = random_subset(ds, args.finetune_images)
    example = calib[0][0][:2]
    keys = full_plan(trace(source, example))
    full = count_flops(source, shape)
    t = time.perf_counter()
    prof = modellego.profile(source, batches(ds.train, 256, transform=model_transform(source, ds)), keep_contributions=True)
    profile_s = time.perf_counter() - t
    common = {"model": arch, "width": ZOO[arch]["width"], "data": data, "base": round(test_accuracy(source, ds).mean_per_class, 2),
              "calibration": args.calibrate, "finetune": f"{args.finetune_epochs} x {args.finetune_images}",
              "torch": torch.__version__, "threads": torch.get_num_threads()}

    def finish(row: dict, plain: nn.Module, refit: nn.Module, seconds: float, refit_s: float) -> None:
        row.update(_measure(plain, source, ds, shape))
        row["plain"] = round(test_accuracy(plain, ds).mean_per_class, 2)
        row["recon"] = round(test_accuracy(refit, ds).mean_per_class, 2)
        row["seconds"], row["recon_seconds"] = round(seconds, 1), round(refit_s, 1)
        if args.finetune_epochs:
            finetune(refit, tune, epochs=args.finetune_epochs, progress=False)
            row["finetuned"] = round(test_accuracy(refit, ds).mean_per_class, 2)
        rows.append(row)
        record(row, args.out)
        print(f"{arch} {data} {row['budget']} {row['method']}: FLOPs {row['flops_ratio']:.1%} plain {row['plain']} "
              f"recon {row['recon']} finetuned {row.get('finetuned', '-')}", file=sys.stderr)

    for budget in args.budgets:
        t = time.perf_counter()
        plain = compress(source, profile=prof, calibrate="none", flops=budget)
        cut_s = time.perf_counter() - t
        t = time.perf_counter()
        refit = compress(source, profile=prof, calibration=calib, calibrate=args.calibrate, flops=budget)
        finish({**common, "budget": budget, "method": "modellego"}, plain, refit, profile_s + cut_s,
               profile_s + time.perf_counter() - t)
        for name in args.criteria or list(criteria):
            make, global_pruning = criteria[name]
            grads = calib[:2] if name == "Taylor" else None

            def prune(r: float, make=make, global_pruning=global_pruning, grads=grads):
                return tp_prune(tp, source, example, make, global_pruning, r, grads)

            t = time.perf_counter()
            ratio, (pruned, history) = bisect_ratio(prune, shape, budget, full)
            prune_s = time.perf_counter() - t
            plan = tp_plan(tp, source, example, history, keys)
            ours = check_plan(source, plan, pruned)
            t = time.perf_counter()
            calibrate(ours, source, classes, calib, args.calibrate, plan=plan)
            finish({**common, "budget": budget, "method": f"Torch-Pruning {name}", "ratio": round(ratio, 4),
                    "fits": count_flops(pruned, shape) <= budget * full},
                   pruned, ours, prune_s, prune_s + time.perf_counter() - t)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["vgg16_bn", "resnet18", "googlenet", "mobilenet_v2"])
    p.add_argument("--data", nargs="*", default=["mnist", "fashion-mnist"])
    p.add_argument("--budgets", nargs="*", type=float, default=[0.7, 0.5, 0.3])
    p.add_argument("--criteria", nargs="*", default=None, help="Torch-Pruning criteria (default: all)")
    p.add_argument("--calibrate", default=DEFAULT_CALIBRATION)
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--finetune-epochs", type=int, default=1)
    p.add_argument("--finetune-images", type=int, default=5000)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/compress.jsonl"))
    args = p.parse_args(argv)
    import torch_pruning as tp
    rows = []
    for arch in args.models:
        for data in args.data:
            path = checkpoint_path(args.cache, arch, data)
            if not path.exists():
                print(f"skipping {arch} on {data}: run benchmarks/train_zoo.py --models {arch} --data {data}", file=sys.stderr)
                continue
            rows += run_source(args, tp, arch, data, modellego.load(path), load_dataset(data))
    print("| model | data | budget | method | FLOPs kept | params | plain % | + recon % | + fine-tune % | ms | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} w{r['width']} | {r['data']} | {r['budget']} | {r['method']} | {r['flops_ratio']:.1%} | "
              f"{r['params']:,} | {r['plain']} | {r['recon']} | {r.get('finetuned', '-')} | {r['latency_ms']} | "
              f"{r['recon_seconds']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
