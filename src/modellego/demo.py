"""The end-to-end demo behind `make demo`: real data, two source models, their components."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from .assembly.assemble import assemble
from .assembly.scaling import SCALINGS, scale_assembly
from .core.profiling import profile
from .cut.disassemble import disassemble
from .data import batches, load_dataset
from .data.tasks import format_classes
from .data.union import union_dataset
from .errors import UserError
from .evaluation.metrics import count_flops
from .evaluation.protocol import calibration_batches, compare, model_transform, scaling_batches, test_accuracy
from .files import load, save
from .io.info import get_info, require_info
from .training.fit import TrainConfig, train

SOURCES = [("mnist", "lenet5", 1.0), ("fashion-mnist", "lenet5", 1.0)]
TASKS = [[0], [0, 1, 2], [3, 4, 5, 6, 7, 8, 9]]
BUDGET = 0.5  # the FLOPs budget of the last columns
LR = 0.05  # LeNet-5 reaches >= 88% on Fashion-MNIST in 6 CPU epochs with it (0.01: 86.9% after 4)


def _source(cache: Path, data: str, arch: str, width: float, epochs: int, device: torch.device):
    path = cache / f"{arch}-{data}-w{width:g}-e{epochs}.safetensors"
    if path.exists():
        try:
            return load(path, map_location=device)
        except UserError:
            pass  # a stale or corrupt cache entry: retrain
    t = time.perf_counter()
    print(f"training {arch} on {data} ({epochs} epochs)...", flush=True)
    model = train(TrainConfig(model=arch, width=width, data=data, epochs=epochs, lr=LR, device=str(device)),
                  progress=sys.stderr.isatty())
    info = get_info(model)
    assert info is not None  # train attaches a full description
    info.provenance["train_seconds"] = round(time.perf_counter() - t, 1)
    save(model, path)
    return model


def _assembly_demo(models: dict, profiles: dict) -> None:
    """MNIST 0-4 + Fashion-MNIST 5-9: assembled without training, each way of scaling."""
    parts, base_sum, n = [], 0.0, 0
    for data, task in (("mnist", [0, 1, 2, 3, 4]), ("fashion-mnist", [5, 6, 7, 8, 9])):
        prof, ds = profiles[data]
        model = models[data]
        parts.append(disassemble(model, task, profile=prof, calibration=calibration_batches(model, ds, task)))
        base_sum += test_accuracy(model, ds, task).mean_per_class * len(task)
        n += len(task)
    asm = assemble(parts)
    union = union_dataset(asm, {d: p[1] for d, p in profiles.items()})
    scaling_images = scaling_batches(asm, union)
    print(f"\nAssembly: MNIST 0-4 + Fashion-MNIST 5-9, {asm.mode}, no training "
          f"(mean per-class test accuracy %, worst class in brackets)")
    print(f"  Base (the two sources, each on its own task): {base_sum / n:.2f}")
    for method in SCALINGS:
        scale_assembly(asm, scaling_images, method)
        acc = test_accuracy(asm, union)
        print(f"  Score1, scaling {method:<10}: {acc.mean_per_class:.2f} [{acc.worst_class:.1f}]")


def _budget_cells(model, prof, ds, task: list[int], calibration) -> tuple[str, str]:
    """Accuracy and FLOPs share of the task's component under the FLOPs budget."""
    comp = disassemble(model, task, profile=prof, calibration=calibration, flops=BUDGET)
    acc = test_accuracy(comp, ds, task)
    shape = prof.provenance["input_shape"]
    return f"{acc.mean_per_class:.2f} [{acc.worst_class:.1f}]", f"{100 * count_flops(comp, shape) / count_flops(model, shape):.1f}%"


def _routes_demo(model, prof, ds, folder: Path) -> None:
    """The routes of two MNIST classes and the class similarity map, and one line of the detector table."""
    from .apps.routes import RouteAnalysis, sample_routes
    from .apps.routes.plots import route_diagram, save_figure, similarity_heatmap
    from .evaluation.attacks import pgd
    from .evaluation.detection import auroc, energy, max_softmax

    analysis = RouteAnalysis.from_profile(prof)
    paths = [save_figure(route_diagram(analysis, [3, 5]), folder / "routes-mnist-3-5.png"),
             save_figure(similarity_heatmap(analysis), folder / "similarity-mnist.png")]
    print(f"\nDecision routes (MNIST LeNet-5): {paths[0]} (classes 3 and 5), {paths[1]}")
    x, y = next(iter(batches(ds.test, 1000, transform=model_transform(model, ds))))
    with torch.no_grad():
        ok = model(x).argmax(1) == y
    x, y = x[ok][:500], y[ok][:500]
    spec = require_info(model, "the demo").input
    assert spec is not None  # the demo's models are trained here and describe their input
    lo, hi = (0 - spec.mean[0]) / spec.std[0], (1 - spec.mean[0]) / spec.std[0]
    adv = pgd(model, x, y, 0.2 / spec.std[0], lo, hi, steps=10)
    clean, attacked = sample_routes(model, x, thresholds=prof.thresholds), sample_routes(model, adv, thresholds=prof.thresholds)
    fooled = attacked.predicted != y
    scores = {"route": lambda r: r.score(analysis), "MSP": lambda r: max_softmax(r.logits), "energy": lambda r: energy(r.logits)}
    cells = ", ".join(f"{k} {auroc(f(clean), f(attacked)[fooled]):.3f}" for k, f in scores.items())
    print(f"Route detector, PGD (L-inf 0.2, 10 steps) on {len(x)} MNIST test images, {int(fooled.sum())} fooled, AUROC: {cells}")


def run_demo(cache: Path, *, epochs: int = 6, device: torch.device | None = None) -> int:
    """Train (or reuse) the source models, print their accuracy, disassemble tasks, print Table 1."""
    device = device or torch.device("cpu")
    torch.manual_seed(0)
    models = {}
    print("\nSource models (test accuracy, best epoch chosen on validation)")
    print(f"{'model':<10} {'data':<14} {'val %':>7} {'test %':>7}")
    for data, arch, width in SOURCES:
        m = _source(cache, data, arch, width, epochs, device)
        models[data] = m
        p = m.modellego_info.provenance
        print(f"{arch:<10} {data:<14} {p['val_accuracy']:7.2f} {p['test_accuracy']:7.2f}")

    print("\nDisassembly (Table 1 protocol; mean per-class test accuracy %, worst class in brackets)")
    print(f"{'data':<14} {'task':<6} {'Base':>7} {'Masked-Base':>15} {'Disa (paper)':>15} "
          f"{'Disa (calibr.)':>15} {'params':>7} {'FLOPs':>7} {'profile s':>9} {'Disa @ budget':>15} {'FLOPs':>7}")
    profiles = {}
    for data, model in models.items():
        ds = load_dataset(data)
        t = time.perf_counter()
        prof = profile(model, batches(ds.train, 256, transform=model_transform(model, ds)), keep_contributions=True)
        profiles[data] = (prof, ds)
        seconds = time.perf_counter() - t
        for task in TASKS:
            r = compare(model, disassemble(model, task, profile=prof), ds).row()
            cal = calibration_batches(model, ds, task)
            rc = compare(model, disassemble(model, task, profile=prof, calibration=cal), ds).row()
            name = format_classes(task)
            cells = [f"{row[k]:.2f} [{row['worst_' + k]:.1f}]" for row, k in ((r, "masked_base"), (r, "disa"), (rc, "disa"))]
            budget = _budget_cells(model, prof, ds, task, cal) if len(task) > 1 else ("-", "-")
            print(f"{data:<14} {name:<6} {r['base']:7.2f} {cells[0]:>15} {cells[1]:>15} {cells[2]:>15} "
                  f"{r['params_pct']:6.1f}% {r['flops_pct']:6.1f}% {seconds:9.1f} {budget[0]:>15} {budget[1]:>7}")
    _assembly_demo(models, profiles)
    print("\nDisa (paper): the faithful cut. Disa (calibr.): the same channels, every layer refitted in closed form")
    print("to the source's outputs on 2,000 training images, then class-balanced (recon+balance, the default;")
    print(f"no gradient step). Disa @ budget: channels located under a budget of {BUDGET:.0%} of the source's FLOPs,")
    print("calibrated the same way. Single-class components score 100% by construction; Masked-Base (the")
    print("source restricted to the task's classes) is the fair baseline.")
    _routes_demo(models["mnist"], *profiles["mnist"], cache / "routes")
    return 0
