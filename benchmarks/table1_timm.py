"""Table 1 on a timm architecture outside the zoo: timm's EfficientNet-B0 trained on MNIST / Fashion-MNIST.

The model is ``timm.create_model(NAME, num_classes=10, in_chans=1)`` at full width (EfficientNet-B0:
16 MBConv blocks with depthwise convolutions, squeeze-and-excitation gates and residual adds), fed
the datasets' own 28 × 28 images (its five stride-2 stages take them to 1 × 1; no resize). It is
trained with the project's training loop (`modellego.training.fit.fit`: SGD with momentum, cosine
schedule, the best validation epoch kept) on a seeded subset of the training split, like the zoo
of ``train_zoo.py``, and cached as a modellego file of a module the zoo cannot rebuild (reloaded
with ``modellego.load(path, model=timm.create_model(...))``). Then ``table1.py``'s protocol runs on
it unchanged (`table1.run_source`: one profile on the whole training split, then per task Base,
Masked-Base, Disa (paper), Disa (calibrated), Disa (recon) and Disa @ budget, with worst classes,
params % and FLOPs %). Results: one JSON row per (model, data, task) appended to
``benchmarks/results/table1_timm.jsonl``, the training run's figures in every row, and a Markdown
table on stdout.

    python benchmarks/table1_timm.py                                   # efficientnet_b0, MNIST, tasks 0 1 0-2 3-9
    python benchmarks/table1_timm.py --data fashion-mnist --tasks 0-2 3-9
    python benchmarks/table1_timm.py --model mobilenetv3_small_100     # another timm architecture

Needs timm (and the torchvision it imports); beside a CPU torch whose torchvision C extension does
not load, the test-only import in tests/vision_models.py is used.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table1 import TASKS, print_table, run_source  # noqa: E402

import modellego  # noqa: E402
from modellego.data import augmentation, load_dataset, preprocessing  # noqa: E402
from modellego.evaluation.protocol import test_accuracy  # noqa: E402
from modellego.io.info import InputSpec, ModelInfo, set_info  # noqa: E402
from modellego.training.fit import FitConfig, fit  # noqa: E402

# The known torchvision-wheel workaround: timm imports torchvision, whose C extension does not load
# beside the pinned CPU torch; the tests' helper imports both with the missing op schemas skipped.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vision_models  # noqa: E402

DATA = ["mnist", "fashion-mnist"]


def build(timm, name: str, num_classes: int, in_chans: int) -> torch.nn.Module:
    return timm.create_model(name, num_classes=num_classes, in_chans=in_chans, pretrained=False)


def checkpoint_path(cache: Path, name: str, data: str, args: argparse.Namespace) -> Path:
    limit = args.train_limit or "all"
    return cache / f"timm-{name}-{data}-e{args.epochs}-n{limit}-lr{args.lr:g}.safetensors"


def training_arguments(p: argparse.ArgumentParser, *, model: str, epochs: int, lr: float) -> None:
    """The options that name a trained, cached model (`get_model`); every script reading the cache takes them."""
    p.add_argument("--model", default=model, help=f"a timm architecture name (default {model})")
    p.add_argument("--epochs", type=int, default=epochs)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--train-limit", type=int, default=20000, help="training images (a seeded subset; 0: all 54,000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=Path(".cache/timm"))


def get_model(timm, name: str, data: str, args: argparse.Namespace) -> torch.nn.Module:
    """The cached trained model, trained with `fit` first if missing; its `ModelInfo` records the run."""
    path = checkpoint_path(args.cache, name, data, args)
    ds = load_dataset(data, train_limit=args.train_limit or None)
    if path.exists():
        return modellego.load(path, model=build(timm, name, ds.num_classes, ds.in_channels))
    torch.manual_seed(args.seed)
    model = build(timm, name, ds.num_classes, ds.in_channels)
    spec = InputSpec(ds.in_channels, tuple(ds.image_size), tuple(ds.mean), tuple(ds.std))
    config = FitConfig(epochs=args.epochs, lr=args.lr, seed=args.seed)
    t = time.perf_counter()
    history = fit(model, ds.train, ds.val, config, transform_train=augmentation("none"),
                  transform_eval=preprocessing(spec.mean, spec.std), progress=False)
    train_s = time.perf_counter() - t
    info = ModelInfo(arch=None, arch_kwargs={}, class_names=tuple(ds.classes), classes=tuple(range(ds.num_classes)),
                     input=spec, dataset=ds.name)
    set_info(model.eval(), info)
    test = test_accuracy(model, ds)
    provenance = {
        "training": {"library": "timm", "timm_version": timm.__version__, "model": name, "data": data,
                     "train_images": len(ds.train), **{k: getattr(config, k) for k in ("epochs", "lr", "batch_size",
                                                                                       "momentum", "weight_decay",
                                                                                       "schedule", "seed")}},
        "history": history, "train_s": train_s,
        "val_accuracy": max(h.get("val_accuracy", 0.0) for h in history),
        "test_accuracy": test.overall, "test_mean_per_class": test.mean_per_class,
        "device": "cpu", "threads": torch.get_num_threads(),
    }
    set_info(model, info.replace(provenance=provenance))
    modellego.save(model, path)
    # What the benchmark measures is the reloaded file (the same tensors), as for the zoo.
    return modellego.load(path, model=build(timm, name, ds.num_classes, ds.in_channels))


def training_tags(model: torch.nn.Module, name: str) -> dict:
    """The training run's figures, added to every Table 1 row of this model."""
    prov = model.modellego_info.provenance
    epoch_s = [h["seconds"] for h in prov["history"] if "seconds" in h]
    return {"library": "timm", "timm_model": name, "timm_version": prov["training"]["timm_version"],
            "params": sum(p.numel() for p in model.parameters()),
            "train_epochs": prov["training"]["epochs"], "train_lr": prov["training"]["lr"],
            "train_images": prov["training"]["train_images"],
            "median_epoch_s": round(statistics.median(epoch_s), 1), "train_s": round(prov["train_s"], 1),
            "source_val_accuracy": round(prov["val_accuracy"], 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    training_arguments(p, model="efficientnet_b0", epochs=2, lr=0.05)
    p.add_argument("--data", nargs="*", default=["mnist"], choices=DATA)
    p.add_argument("--tasks", nargs="*", default=TASKS, help="class lists, e.g. 0 1 0-2 3-9 (default)")
    # table1.py's options, with its defaults
    p.add_argument("--batch", type=int, default=256, help="batch size of the profiling pass over the training set")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--budget", type=float, default=0.5, help="FLOPs budget of the budget column (0: no such column)")
    p.add_argument("--budget-rank", choices=("task", "class"), default="task")
    p.add_argument("--no-recon", dest="recon", action="store_false", help="skip the recon column")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/table1_timm.jsonl"))
    args = p.parse_args(argv)
    timm = vision_models.load("timm")
    if timm is None:
        print("timm is needed: pip install 'torch==2.13.0' timm", file=sys.stderr)
        return 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    for data in args.data:
        t = time.perf_counter()
        model = get_model(timm, args.model, data, args).eval()
        tags = training_tags(model, args.model)
        print(f"{args.model} {data}: {tags['params']:,} parameters, trained {tags['train_s']} s, "
              f"test {model.modellego_info.provenance['test_accuracy']:.2f}%", file=sys.stderr, flush=True)
        rows += run_source(model, args.model, 1.0, data, args.tasks, args, tags=tags)
        print(f"{args.model} {data}: done in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
