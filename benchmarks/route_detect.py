"""Routes as a detector, beside the training-free baselines, on the same images in one run.

For each benchmark model (trained on MNIST; the LeNet-5 also on Fashion-MNIST for the reverse
out-of-distribution task) three tasks, each a set of normal and a set of flagged test inputs:
  errors  correctly classified test images vs misclassified ones (the whole test split);
  ood     2,000 test images of the model's dataset vs 2,000 of the other dataset;
  fgsm /  1,000 correctly classified test images vs their adversarial versions that fool the
  pgd     model (L∞, eps 0.2 in pixel units; PGD 10 steps from a random start).
Scores (high = normal): route (Jaccard of the input's route with its predicted class's route,
`modellego.apps.routes`), maximum softmax probability, energy, Mahalanobis (penultimate features,
shared covariance fitted on 2,000 training images), and the route score added to each baseline
after standardising both on the training images' scores. AUROC and FPR at 95% TPR per score.

    python benchmarks/route_detect.py                       # lenet5, vgg16_bn, resnet18
    python benchmarks/route_detect.py --models lenet5
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from rows import record
from train_zoo import ZOO, get_model

import modellego
from modellego.apps.routes import RouteAnalysis, sample_routes
from modellego.apps.routes.detect import Mahalanobis
from modellego.core.graph import trace
from modellego.data import batches, load_dataset
from modellego.evaluation.attacks import fgsm, pgd
from modellego.evaluation.detection import auroc, energy, fpr_at_tpr, max_softmax, standardised_sum
from modellego.evaluation.protocol import model_transform

OTHER = {"mnist": "fashion-mnist", "fashion-mnist": "mnist"}
EPS = 0.2  # L∞ radius in pixel units ([0, 1] images)


def images(model: torch.nn.Module, data: str, split: str, n: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset(data)
    part = getattr(ds, split)
    if n is not None:
        part = part.select(torch.arange(min(n, len(part))))
    x, y = zip(*batches(part, 1000, transform=model_transform(model, ds)))
    return torch.cat(x), torch.cat(y)


class Scorer:
    """Every score of a set of inputs, for one model and its profile."""

    def __init__(self, model: torch.nn.Module, analysis: RouteAnalysis, thresholds, maha: Mahalanobis) -> None:
        self.model, self.analysis, self.thresholds, self.maha = model, analysis, thresholds, maha
        self.graph = None

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self.graph = self.graph or trace(self.model, x[:1])
        r = sample_routes(self.model, x, thresholds=self.thresholds, graph=self.graph)
        feats = torch.cat([self.maha.features(x[i: i + 1000])[1] for i in range(0, len(x), 1000)])
        return {"route": r.score(self.analysis), "msp": max_softmax(r.logits).double(), "energy": energy(r.logits).double(),
                "mahalanobis": self.maha.score(feats), "predicted": r.predicted}


COMBINED = ("msp", "energy", "mahalanobis")


def with_combinations(s: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v for k, v in s.items() if k != "predicted"}
    for b in COMBINED:
        out[f"route+{b}"] = standardised_sum([ref["route"], ref[b]], [s["route"], s[b]])
    return out


def run(name: str, data: str, cache: Path, out: Path, n_ood: int, n_adv: int) -> list[dict]:
    t0 = time.perf_counter()
    model = get_model(cache, name, data)
    model.eval()
    train_x, train_y = images(model, data, "train", None)
    prof = modellego.profile(model, [(train_x[i: i + 256], train_y[i: i + 256]) for i in range(0, len(train_x), 256)])
    analysis = RouteAnalysis.from_profile(prof)
    graph = trace(model, train_x[:1])
    head = next(n for n, ly in graph.layers.items() if ly.node is graph.output)
    g = torch.Generator().manual_seed(0)
    ref_idx = torch.randperm(len(train_x), generator=g)[:2000]
    maha = Mahalanobis(model, head).fit([(train_x[ref_idx], train_y[ref_idx])])
    scorer = Scorer(model, analysis, prof.thresholds, maha)
    ref = scorer(train_x[ref_idx])
    test_x, test_y = images(model, data, "test", None)
    test = scorer(test_x)
    ok = test["predicted"] == test_y
    tasks: dict[str, tuple[dict, dict]] = {}
    both = with_combinations(test, ref)
    tasks["errors"] = ({k: v[ok] for k, v in both.items()}, {k: v[~ok] for k, v in both.items()})
    other_x, _ = images(model, OTHER[data], "test", n_ood)
    tasks["ood"] = ({k: v[:n_ood] for k, v in both.items()}, with_combinations(scorer(other_x), ref))
    clean_idx = torch.nonzero(ok).flatten()[:n_adv]
    clean_x, clean_y = test_x[clean_idx], test_y[clean_idx]
    info = modellego.get_info(model)
    spec = info.input if info and info.input else None
    mean = torch.tensor(spec.mean if spec else (0.0,)).view(1, -1, 1, 1)
    std = torch.tensor(spec.std if spec else (1.0,)).view(1, -1, 1, 1)
    lo, hi = (0 - mean) / std, (1 - mean) / std
    eps = EPS / float(std.min())  # pixel units -> the model's normalised units (one channel here)
    clean = with_combinations(scorer(clean_x), ref)
    for attack in ("fgsm", "pgd"):
        adv_x = torch.cat([(fgsm(model, clean_x[i: i + 250], clean_y[i: i + 250], eps, lo, hi) if attack == "fgsm" else
                            pgd(model, clean_x[i: i + 250], clean_y[i: i + 250], eps, lo, hi, steps=10, seed=i))
                           for i in range(0, len(clean_x), 250)])
        adv = scorer(adv_x)
        fooled = adv["predicted"] != clean_y
        tasks[attack] = (clean, {k: v[fooled] for k, v in with_combinations(adv, ref).items()})
    rows = []
    for task, (normal, flagged) in tasks.items():
        for score in normal:
            row = {"model": name, "width": ZOO[name]["width"], "data": data, "task": task, "score": score,
                   "normal": len(normal[score]), "flagged": len(flagged[score]),
                   "auroc": round(auroc(normal[score], flagged[score]), 4),
                   "fpr95": round(fpr_at_tpr(normal[score], flagged[score]), 4), "eps": EPS if task in ("fgsm", "pgd") else None,
                   "test_accuracy": round(100 * float(ok.double().mean()), 2), "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t0, 1)}
            record(row, out)
            rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    scores = list(dict.fromkeys(r["score"] for r in rows))
    lines = ["| model | data | task | normal / flagged | " + " | ".join(scores) + " |",
             "|---|---|---|---|" + "---|" * len(scores)]
    keys = list(dict.fromkeys((r["model"], r["data"], r["task"]) for r in rows))
    for m, d, t in keys:
        sel = {r["score"]: r for r in rows if (r["model"], r["data"], r["task"]) == (m, d, t)}
        best = max(v["auroc"] for k, v in sel.items() if not k.startswith("route"))
        cells = [f"**{sel[s]['auroc']:.3f}**" if sel[s]["auroc"] > best and s.startswith("route") else f"{sel[s]['auroc']:.3f}"
                 for s in scores]
        first = next(iter(sel.values()))
        lines.append(f"| {m} | {d} | {t} | {first['normal']} / {first['flagged']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["lenet5:mnist", "lenet5:fashion-mnist", "vgg16_bn:mnist", "resnet18:mnist"],
                   help="model:data pairs")
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/route_detect.jsonl"))
    p.add_argument("--ood-images", type=int, default=2000)
    p.add_argument("--adv-images", type=int, default=1000)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    for item in args.models:
        name, _, data = item.partition(":")
        rows += run(name, data or "mnist", args.cache, args.out, args.ood_images, args.adv_images)
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
