"""Train the benchmark zoo on MNIST and Fashion-MNIST; record epoch time and test accuracy.

The trained checkpoints are cached (default ``.cache/zoo``) and reused by the disassembly and
assembly benchmarks. Results: one JSON row per run in ``benchmarks/results/train_zoo.jsonl`` and
a Markdown table on stdout.

    python benchmarks/train_zoo.py                 # every model, both datasets
    python benchmarks/train_zoo.py --models lenet5 --data mnist
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from rows import record  # the script's folder is on sys.path (importers put it there too)

import modellego
from modellego.training.fit import TrainConfig, train

# Widths and budgets sized for a 2-core CPU (epoch times in BENCHMARKS.md).
ZOO = {
    "lenet5": dict(width=1.0, epochs=6, train_limit=None, lr=0.05),
    "vgg16_bn": dict(width=0.25, epochs=2, train_limit=20000),
    "resnet18": dict(width=0.25, epochs=2, train_limit=20000),
    "googlenet": dict(width=0.0625, epochs=2, train_limit=20000),
    "mobilenet_v2": dict(width=0.25, epochs=2, train_limit=20000),
    "mobilenet_v3_small": dict(width=0.5, epochs=2, train_limit=20000),
}
DATA = ["mnist", "fashion-mnist"]


def checkpoint_path(cache: Path, model: str, data: str) -> Path:
    cfg = ZOO[model]
    limit = cfg["train_limit"] or "all"
    return cache / f"{model}-w{cfg['width']:g}-{data}-e{cfg['epochs']}-n{limit}.safetensors"


def get_model(cache: Path, model: str, data: str, *, progress: bool = False) -> torch.nn.Module:
    """The cached benchmark model, trained first if missing."""
    path = checkpoint_path(cache, model, data)
    if path.exists():
        return modellego.load(path)
    cfg = ZOO[model]
    m = train(TrainConfig(model=model, data=data, width=cfg["width"], epochs=cfg["epochs"],
                          train_limit=cfg["train_limit"], lr=cfg.get("lr", 0.01)), progress=progress)
    modellego.save(m, path)
    return m


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=list(ZOO))
    p.add_argument("--data", nargs="*", default=DATA)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/train_zoo.jsonl"))
    args = p.parse_args(argv)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for data in args.data:
            t = time.perf_counter()
            m = get_model(args.cache, model, data)
            prov = m.modellego_info.provenance
            epoch_s = [h["seconds"] for h in prov["history"]]
            cfg = ZOO[model]
            row = {
                "model": model, "width": cfg["width"], "data": data, "epochs": cfg["epochs"], "lr": cfg.get("lr", 0.01),
                "train_images": cfg["train_limit"] or "all (54,000)",
                "median_epoch_s": round(sorted(epoch_s)[len(epoch_s) // 2], 1),
                "val_accuracy": round(prov["val_accuracy"], 2), "test_accuracy": round(prov["test_accuracy"], 2),
                "params": sum(p.numel() for p in m.parameters()),
                "threads": prov.get("threads"), "torch": torch.__version__, "wall_s": round(time.perf_counter() - t, 1),
            }
            rows.append(row)
            record(row, args.out)
    print("| model | width | data | epochs | lr | train images | s/epoch | val % | test % | params |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['width']} | {r['data']} | {r['epochs']} | {r['lr']} | {r['train_images']} | "
              f"{r['median_epoch_s']} | {r['val_accuracy']} | {r['test_accuracy']} | {r['params']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
