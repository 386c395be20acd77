"""The `modellego` command: one entry point, thin subcommands over the public API."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ._version import __version__
from .errors import ModellegoError, UserError
from .io.info import require_info

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

log = logging.getLogger("modellego")

EXAMPLES = {
    "train": "modellego train --model vgg16_bn --width 0.25 --data fashion-mnist --epochs 5 -o runs/vgg-fashion",
    "evaluate": "modellego evaluate runs/vgg-fashion --data fashion-mnist --classes 0-2 --json",
    "profile": "modellego profile runs/vgg-fashion --data fashion-mnist -o runs/vgg-fashion.profile",
    "disassemble": "modellego disassemble runs/vgg-fashion --classes 0-2 --profile runs/vgg-fashion.profile -o runs/vgg-fashion-0-2",
    "models": "modellego models",
    "assemble": "modellego assemble runs/mnist-0-4 runs/fashion-5-9 -o runs/asm --scaling density",
    "merge": "modellego merge runs/vgg-fashion runs/vgg-fashion-0-2 runs/vgg-fashion-7 -o runs/vgg-fashion-0-2-7 --data fashion-mnist",
    "demo": "modellego demo --cache .cache/demo",
    "routes": "modellego routes runs/lenet5-mnist --data mnist --sample 247 -o runs/sample-247.png",
    "amalgamate": "modellego amalgamate runs/mnist runs/fashion --classes 0-4 5-9 --student lenet5 --width 1 --epochs 6 -o runs/ka",
    "distill": "modellego distill runs/asm --student lenet5 --width 0.5 --epochs 6 -o runs/asm-distilled",
    "compress": "modellego compress runs/vgg-fashion --data fashion-mnist --flops 0.7,0.5,0.3 --paper -o runs/vgg-compressed",
}


class _Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (and a pointer to --help) instead of usage plus message."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind: type, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
            hi_open: bool = False) -> Callable[[str], int | float]:
    """An argparse type: an int or finite float in a range (a bad value is one line, not a traceback)."""
    def parse(text: str) -> int | float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or \
            (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            raise argparse.ArgumentTypeError(f"expected a value in {left}{lo if lo is not None else '-inf'}, "
                                             f"{hi if hi is not None else 'inf'}{right}, got {text}")
        return v
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _fractions(text: str) -> list[float]:
    """An argparse type: comma-separated fractions in (0, 1], e.g. 0.7,0.5,0.3."""
    parse = _number(float, 0, 1, lo_open=True)
    parts = [t for t in text.split(",") if t.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected fractions such as 0.5 or 0.7,0.5,0.3, got {text!r}")
    values = [float(parse(t.strip())) for t in parts]
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"a budget is repeated in {text!r}")
    return values


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def _bytes(text: str) -> int:
    """An argparse type: a number of bytes, with an optional K, M, G or T (powers of 1024), e.g. 2G."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    unit = t[-1] if t and t[-1] in _UNITS else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected bytes such as 512M or 2G, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of bytes >= 0, got {text!r}")
    return int(value * _UNITS[unit])


_bytes.__name__ = "bytes"
POSITIVE_INT = _number(int, 1)
COUNT = _number(int, 0)
POSITIVE = _number(float, 0, lo_open=True)
FRACTION = _number(float, 0, 1, lo_open=True)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="modellego", description="Model LEGO: disassemble and assemble trained CNN classifiers.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  " + "\n  ".join(EXAMPLES[k] for k in ("demo", "train", "profile", "disassemble", "assemble", "merge")))
    p.add_argument("--version", action="version", version=f"modellego {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help, add_args) in SUBCOMMANDS.items():
        # Raw: the default formatter re-wraps the example at hyphens ("runs/vgg-" / "fashion"), breaking copy-paste.
        s = sub.add_parser(name, help=help, description=help, epilog=f"example: {EXAMPLES[name]}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(s)
    return p


def _data_args(s: argparse.ArgumentParser, required: bool = True) -> None:
    s.add_argument("--data", required=required, help="dataset name (mnist, fashion-mnist, cifar10, cifar100, imagefolder, synthetic)")
    s.add_argument("--data-dir", help="folder with the dataset files")
    s.add_argument("--download", action="store_true", help="download the dataset if missing (needs a network)")
    s.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")


def _stream_args(s: argparse.ArgumentParser) -> None:
    """Reading --data imagefolder image by image, for folders too large for memory."""
    s.add_argument("--stream", action="store_true",
                   help="with --data imagefolder: decode the images one by one while passing over them (memory "
                        "independent of the folder's size), resized and center-cropped to the model's input")
    s.add_argument("--workers", type=COUNT, default=0, help="with --stream: image decoding processes (default 0)")
    s.add_argument("--resize", type=POSITIVE_INT, default=None,
                   help="with --stream: shorter side before the center crop (default: the input side / 0.875)")


LIBRARY_MODELS = ("\n\nMODEL may also be timm:NAME or torchvision:NAME, built with the dataset's classes and channels\n"
                  "(unless --num-classes / --in-channels say otherwise) and loaded with --weights:\n"
                  "  modellego {command} timm:resnet18 --weights resnet18.safetensors --data cifar10 ...")


def _model_args(s: argparse.ArgumentParser) -> None:
    """MODEL as a model file, or an architecture of timm or torchvision built here (profile, disassemble, evaluate)."""
    s.description = (s.description or "") + LIBRARY_MODELS.format(command=s.prog.split()[-1])
    s.add_argument("model", help="model file (or its folder), or timm:NAME / torchvision:NAME (e.g. timm:resnet18), "
                                 "built with the dataset's classes and channels")
    s.add_argument("--weights", help="with timm:NAME / torchvision:NAME: its state dict, a .safetensors file or a "
                                     ".pt / .pth file (read with torch.load(weights_only=True)); default: random weights")
    s.add_argument("--num-classes", type=POSITIVE_INT, default=None,
                   help="with timm:NAME / torchvision:NAME: outputs (default: the dataset's classes)")
    s.add_argument("--in-channels", type=POSITIVE_INT, default=None,
                   help="with timm:NAME / torchvision:NAME: input channels (default: the dataset's)")
    s.add_argument("--input-size", type=POSITIVE_INT, default=None,
                   help="with timm:NAME / torchvision:NAME: side of the square input the images are resized to "
                        "(default: the dataset's image size; 224 with --stream)")


def _models_command(s: argparse.ArgumentParser) -> None:
    """`models` takes no arguments."""


def _train_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True)
    s.add_argument("--width", type=POSITIVE, default=1.0, help="channel width multiplier")
    _data_args(s)
    for flag, typ, default, h in [("--epochs", POSITIVE_INT, 5, "epochs"), ("--batch-size", POSITIVE_INT, 128, "batch size"),
                                  ("--lr", POSITIVE, 0.01, "learning rate"),
                                  ("--momentum", _number(float, 0, 1, hi_open=True), 0.9, "SGD momentum"),
                                  ("--weight-decay", _number(float, 0), 5e-4, "weight decay"), ("--seed", COUNT, 0, "random seed"),
                                  ("--val-fraction", _number(float, 0, 1, hi_open=True), 0.1, "share of train held out for validation"),
                                  ("--train-limit", POSITIVE_INT, None, "use only this many training images")]:
        s.add_argument(flag, type=typ, default=default, help=f"{h} (default: {default})")
    s.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    s.add_argument("--augment", default="auto", help="auto, none, crop, crop-flip")
    s.add_argument("--bf16", action="store_true", help="bf16 autocast (about 2x faster on recent CPUs)")
    s.add_argument("--channels-last", action="store_true", help="channels_last memory format")
    s.add_argument("-o", "--output", required=True, help="output folder or .safetensors file")


def _evaluate_command(s: argparse.ArgumentParser) -> None:
    _model_args(s)
    _data_args(s, required=False)
    s.add_argument("--classes", help="task, e.g. 0-2, 3,5,7 or class names (default: the model's classes)")
    s.add_argument("--split", default="test", choices=["test", "val", "train"])
    _stream_args(s)
    s.add_argument("--json", action="store_true", help="print one JSON object")


def _profile_command(s: argparse.ArgumentParser) -> None:
    s.description = (s.description or "") + ("\n\nLaunched by torchrun, each of the N processes reads every N-th training image and\n"
                      "the first writes the profile of all of them:\n"
                      "  torchrun --standalone --nproc-per-node N -m modellego.cli profile MODEL --data NAME -o PROFILE")
    _model_args(s)
    _data_args(s)
    _stream_args(s)
    _selection_args(s)
    s.add_argument("--keep-contributions", action="store_true",
                   help="store every class's relative contributions (4 bytes per weight and class) so that "
                        "`disassemble --flops` can locate again without profiling")
    s.add_argument("-o", "--output", required=True, help="profile file (.safetensors)")


def _disassemble_command(s: argparse.ArgumentParser) -> None:
    _model_args(s)
    s.add_argument("--classes", required=True, help="task, e.g. 0-2, 3,5,7 or class names, in output order")
    s.add_argument("--profile", help="profile from `modellego profile` (else computed from --data)")
    s.add_argument("--calibrate", default=None,
                   help="training-free calibration from --data training images: none (the paper's faithful "
                        "cut), recon, bn, affine, refit, balance or a '+' combination (default: recon+balance "
                        "when --data is given, else none)")
    s.add_argument("--calibration-images", type=POSITIVE_INT, default=2000, help="training images used to calibrate (default 2000)")
    s.add_argument("--flops", type=FRACTION, default=None,
                   help="FLOPs budget as a fraction of the model's, e.g. 0.5: every layer keeps the same share of "
                        "its most relevant inputs, the largest that fits (needs a profile made with "
                        "--keep-contributions, or --data)")
    s.add_argument("--budget-rank", choices=("task", "class"), default="task",
                   help="with --flops: rank each layer's inputs for the task's classes together (task, one share "
                        "per layer) or keep a share per class and their union (class)")
    _data_args(s, required=False)
    _stream_args(s)
    _selection_args(s)
    s.add_argument("-o", "--output", required=True, help="component folder or .safetensors file")


def _assemble_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("components", nargs="+", help="component (or model) files")
    s.add_argument("--mode", choices=["auto", "padded", "parallel"], default="auto",
                   help="padded: block-diagonal layers (the paper); parallel: side by side; auto: padded when possible")
    s.add_argument("--scaling", choices=["none", "paper", "calibrated", "density"], default="density",
                   help="make the components' outputs comparable from training images: none, paper (Eqs. 12-14), "
                        "calibrated (fitted scale, bias and confidence weight) or density (calibrated plus each "
                        "component's Gaussian 'mine' score on its own features; default)")
    s.add_argument("--images-per-class", type=POSITIVE_INT, default=200, help="training images per class for scaling (default 200)")
    s.add_argument("--finetune-epochs", type=COUNT, default=0,
                   help="optional fine-tuning epochs on the union task (before scaling, which is then fitted to the tuned network)")
    s.add_argument("--lr", type=POSITIVE, default=0.01, help="fine-tuning learning rate")
    s.add_argument("--data-dir", help="folder with the components' datasets (default: the offline copies)")
    s.add_argument("--download", action="store_true")
    s.add_argument("--device")
    s.add_argument("-o", "--output", required=True)


def _merge_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="the model the components were cut from")
    s.add_argument("components", nargs="+", help="component files of that model")
    s.add_argument("--calibrate", default=None,
                   help="as for disassemble (default: recon+balance when --data is given, else none)")
    s.add_argument("--calibration-images", type=POSITIVE_INT, default=2000, help="training images used to calibrate (default 2000)")
    _data_args(s, required=False)
    s.add_argument("-o", "--output", required=True, help="merged component folder or .safetensors file")


def _routes_command(s: argparse.ArgumentParser) -> None:
    s.description = (s.description or "") + (
        "\n\nWithout --sample: writes OUTPUT/routes.json (per layer: each class's channels, shared and exclusive\n"
        "counts, class x class Jaccard; where each pair of routes parts) and three figures: the route\n"
        "diagram of --classes, the class similarity heat map and the per-layer overlap curve.\n"
        "With --sample I: explains test image I (its own route against its true and predicted classes')\n"
        "and writes that figure to OUTPUT (.png, .svg or .pdf).\n"
        "  modellego routes runs/lenet5-mnist --profile runs/lenet5-mnist.profile --classes 3,5 -o runs/routes")
    s.add_argument("model")
    s.add_argument("--profile", help="profile from `modellego profile` (else computed from --data)")
    s.add_argument("--classes", help="classes of the route diagram, e.g. 3,5 (default: the first two)")
    s.add_argument("--sample", type=COUNT, help="index of a --split image to explain")
    s.add_argument("--split", choices=("test", "train"), default="test", help="split of --sample (default test)")
    s.add_argument("--format", default="png", help="figure formats without --sample, e.g. png,svg (default png)")
    _data_args(s, required=False)
    _selection_args(s)
    s.add_argument("-o", "--output", required=True, help="folder (without --sample) or figure file (with --sample)")


def _demo_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("--cache", default=".cache/demo", help="where trained models are cached")
    s.add_argument("--epochs", type=POSITIVE_INT, default=6)
    s.add_argument("--device")


def _student_args(s: argparse.ArgumentParser) -> None:
    """The student and its training (amalgamate and distill)."""
    s.description = (s.description or "") + (
        "\n\nThe student is trained without labels on the union of the teachers' training images to match\n"
        "their softened logits, concatenated: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over images;\n"
        "each teacher reads the images through its own input transform. The epoch with the lowest loss on\n"
        "the union's validation images is kept. The output is evaluated like an assembly:\n"
        "  modellego evaluate OUTPUT --json")
    s.add_argument("--student", help="zoo model of the student (default: the first teacher's architecture)")
    s.add_argument("--width", type=POSITIVE, default=None,
                   help="student width multiplier (default: the first teacher's for its architecture, else 1)")
    for flag, typ, default, h in [("--epochs", POSITIVE_INT, 5, "epochs"), ("--batch-size", POSITIVE_INT, 128, "batch size"),
                                  ("--lr", POSITIVE, 0.01, "SGD learning rate"), ("--temperature", POSITIVE, 4.0, "softmax temperature T"),
                                  ("--seed", COUNT, 0, "seed of the student's initialisation and image order"),
                                  ("--images", POSITIVE_INT, None, "train on this many random union training images (default all)")]:
        s.add_argument(flag, type=typ, default=default, help=f"{h} (default: {default})")
    s.add_argument("--resize", action="store_true", help="let teachers of another input size read the images resized")
    s.add_argument("--data-dir", help="folder with the teachers' datasets (default: the offline copies)")
    s.add_argument("--download", action="store_true")
    s.add_argument("--device")
    s.add_argument("-o", "--output", required=True, help="student folder or .safetensors file")


def _amalgamate_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("teachers", nargs="+", help="two or more teacher files (models, components or assemblies) of disjoint classes")
    s.add_argument("--classes", nargs="+", help="one task per teacher, e.g. --classes 0-4 5-9: each teacher's outputs "
                                                  "restricted to it (default: all its classes)")
    _student_args(s)


def _compress_command(s: argparse.ArgumentParser) -> None:
    s.description = (s.description or "") + (
        "\n\nThe component of every class: under each --flops budget every layer keeps the same share of its\n"
        "inputs most relevant to all classes (the largest that fits), and with --paper the paper's form (all\n"
        "classes at the thresholds). Each is calibrated from --data training images (no gradient step) and\n"
        "measured on its test split. One model: OUTPUT is its file. Several: OUTPUT is a folder with one file\n"
        "per model, compress.json, compress.md (the table) and compress.png (accuracy against FLOPs and\n"
        "parameters kept).")
    s.add_argument("model")
    s.add_argument("--flops", type=_fractions, default=None,
                   help="FLOPs budget(s) as fractions of the model's, e.g. 0.5 or 0.7,0.5,0.3")
    s.add_argument("--paper", action="store_true",
                   help="also the paper's form: all classes at the thresholds, no budget (the default without --flops)")
    s.add_argument("--calibrate", default="recon+balance",
                   help="none, recon, bn, affine, refit, balance or a '+' combination (default: recon+balance)")
    s.add_argument("--calibration-images", type=POSITIVE_INT, default=2000, help="training images used to calibrate (default 2000)")
    s.add_argument("--finetune-epochs", type=COUNT, default=0, help="fine-tune each compressed model this many epochs (default 0)")
    _data_args(s)
    _selection_args(s)
    s.add_argument("-o", "--output", required=True, help="model file (one model) or folder (several)")


def _distill_command(s: argparse.ArgumentParser) -> None:
    s.add_argument("teacher", help="teacher file: typically an assembly (with its head), or a model to compress")
    s.add_argument("--classes", help="the teacher's outputs restricted to this task (default: all its classes)")
    _student_args(s)


# Each subcommand: its help line and the function that adds its arguments.
SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "models": ("list the model zoo", _models_command),
    "train": ("train a zoo model on a dataset (SGD, cosine schedule, best epoch on validation)", _train_command),
    "evaluate": ("accuracy (overall, per class, Base and Masked-Base), parameters, FLOPs and latency", _evaluate_command),
    "profile": ("select samples and locate every class's relevant channels (the route map)", _profile_command),
    "disassemble": ("cut a task's component out of a model (no training)", _disassemble_command),
    "assemble": ("assemble components into one model for the union of their classes (no training)", _assemble_command),
    "merge": ("merge components of one source model through the union of their channels (no training)", _merge_command),
    "routes": ("decision routes: per-class routes compared and drawn, or one image's route explained", _routes_command),
    "demo": ("train two LeNet-5 models (MNIST, Fashion-MNIST), disassemble them, print the tables", _demo_command),
    "amalgamate": ("knowledge amalgamation: train one student for the union of the teachers' classes from their "
                   "softened outputs", _amalgamate_command),
    "distill": ("train one compact student from one teacher's softened outputs (e.g. an assembly's)", _distill_command),
    "compress": ("model compression: the component of every class, under FLOPs budgets or at the paper's "
                 "thresholds (no training)", _compress_command),
}


def _selection_args(s: argparse.ArgumentParser) -> None:
    """Sample selection, contribution mode, kernel and thresholds (profile and disassemble)."""
    s.add_argument("--fraction", type=FRACTION, default=0.01, help="share of correct training samples per class (default 0.01)")
    s.add_argument("--min-per-class", type=POSITIVE_INT, default=5)
    s.add_argument("--max-per-class", type=POSITIVE_INT, default=256)
    s.add_argument("--mode", choices=["sample", "mean"], default="sample",
                   help="ReLU per sample then sum (reference), or average features first (paper text)")
    s.add_argument("--kernel", choices=["torch", "triton"], default="torch",
                   help="per-sample contributions with tensor ops (any device) or one fused Triton kernel "
                        "(CUDA only)")
    s.add_argument("--memory-budget", type=_bytes, default=None, metavar="BYTES",
                   help="contribution sums held at once, e.g. 4G (default: half the free memory, shared by the "
                        "processes of this host)")
    s.add_argument("--hold-budget", type=_bytes, default=None, metavar="BYTES",
                   help="selection candidates' inputs held during its pass before the data is read again, e.g. 2G "
                        "(default as --memory-budget)")
    for name, default in [("conv-alpha", 0.3), ("conv-beta", 0.2), ("linear-alpha", 0.4), ("linear-beta", 0.3)]:
        s.add_argument(f"--{name}", type=FRACTION, default=default, help=f"(default {default})")


def _device(args: argparse.Namespace) -> torch.device:
    from .training.fit import default_device
    return default_device(getattr(args, "device", None))


def _dataset(args: argparse.Namespace):
    """--data, read once per command (building a timm:/torchvision: model reads it too)."""
    from .data import load_dataset
    key = (args.data, args.data_dir, args.download)
    cached = getattr(args, "_dataset", None)
    if cached is None or cached[0] != key:
        cached = (key, load_dataset(args.data, args.data_dir, download=args.download))
        args._dataset = cached
    return cached[1]


def _source(args: argparse.Namespace, device: torch.device):
    """MODEL: a model file, or a timm:NAME / torchvision:NAME architecture built for --data with --weights."""
    from .files import load
    from .models.registry import library_of
    flags = [f for f, v in (("--weights", args.weights), ("--num-classes", args.num_classes),
                            ("--in-channels", args.in_channels), ("--input-size", args.input_size)) if v is not None]
    if library_of(args.model) is None or Path(args.model).exists():  # "C:/runs/m" is a file
        if flags:
            raise UserError(f"{flags[0]} goes with MODEL timm:NAME or torchvision:NAME; {args.model} is a model file")
        return load(args.model, map_location=device)
    return _library_model(args).to(device).eval()


def _library_model(args: argparse.Namespace):
    """A timm or torchvision architecture with the data's classes, channels and size, and --weights."""
    from .files import load_weights
    from .io.info import InputSpec, ModelInfo, get_info, set_info
    from .models import create_model
    if not args.data:
        raise UserError(f"{args.model} takes its classes and input from the data: give --data NAME")
    if getattr(args, "stream", False):
        # A streamed folder has no statistics of its own: ImageNet's, what both libraries train with (grey: their mean).
        from .data import canonical_name
        from .data.stream import IMAGENET_MEAN, IMAGENET_STD, StreamedImageFolder
        if canonical_name(args.data) != "imagefolder" or not args.data_dir:
            raise UserError("--stream reads an image folder: give --data imagefolder --data-dir FOLDER")
        channels = args.in_channels or 3
        side = args.input_size or 224
        mean = tuple(IMAGENET_MEAN) if channels == 3 else (sum(IMAGENET_MEAN) / 3,) * channels
        std = tuple(IMAGENET_STD) if channels == 3 else (sum(IMAGENET_STD) / 3,) * channels
        folder = StreamedImageFolder(args.data_dir, "train", size=side, resize=args.resize, channels=channels,
                                     mean=mean, std=std)
        vars(args).setdefault("_listed", {})["train"] = folder  # what `_streamed` would list again
        names = folder.classes
        dataset, size = "imagefolder", (side, side)
    else:
        ds = _dataset(args)
        channels = args.in_channels or ds.in_channels
        names, dataset = tuple(ds.classes), ds.name
        size = (args.input_size, args.input_size) if args.input_size else ds.image_size
        # The dataset's own statistics, as `modellego train` uses (grey images read as RGB: repeated).
        mean, std = (ds.mean, ds.std) if channels == ds.in_channels else (ds.mean[:1] * channels, ds.std[:1] * channels)
    num_classes = args.num_classes or len(names)
    if num_classes < len(names):
        raise UserError(f"--num-classes {num_classes} is fewer than the {len(names)} classes of {dataset}: "
                        "the labels would name outputs the model does not have")
    with torch.random.fork_rng(devices=[]):  # the same random weights on every run, without --weights
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=num_classes, in_channels=channels)
    if args.weights:
        load_weights(model, args.weights)
    else:
        print(f"note: no --weights, so {args.model} has random weights", file=sys.stderr)
    info = get_info(model)
    assert info is not None  # create_model describes what it builds
    extra = tuple(str(i) for i in range(len(names), num_classes))
    return set_info(model, ModelInfo(
        arch=info.arch, arch_kwargs=info.arch_kwargs, class_names=names + extra, classes=tuple(range(num_classes)),
        input=InputSpec(channels, (size[0], size[1]), tuple(mean), tuple(std)), dataset=dataset,
        provenance={"weights": Path(args.weights).name if args.weights else None}))


def _streamed(model, args: argparse.Namespace, split: str = "train", *, classes=None, group=None):
    """--stream: this process's shard of --data-dir's `split`, decoded image by image for `model`."""
    from .core.distributed import world
    from .data import canonical_name
    from .evaluation.protocol import model_folder, model_stream
    if canonical_name(args.data or "") != "imagefolder" or not args.data_dir:
        raise UserError("--stream reads an image folder: give --data imagefolder --data-dir FOLDER")
    listed = vars(args).setdefault("_listed", {})  # one walk of the tree per command (profile, then calibrate)
    if split not in listed:
        listed[split] = model_folder(model, args.data_dir, split, resize=args.resize)
    return model_stream(model, listed[split], split, workers=args.workers, classes=classes, shard=world(group))


def _thresholds(args: argparse.Namespace):
    from .core.locate import Thresholds
    return Thresholds(args.conv_alpha, args.conv_beta, args.linear_alpha, args.linear_beta)


def cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models
    print("\n".join(list_models()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .files import save
    from .training.fit import TrainConfig, train
    cfg = TrainConfig(model=args.model, width=args.width, data=args.data, data_dir=args.data_dir, epochs=args.epochs,
                      batch_size=args.batch_size, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay,
                      schedule=args.schedule, augment=args.augment, seed=args.seed, val_fraction=args.val_fraction,
                      train_limit=args.train_limit, bf16=args.bf16, channels_last=args.channels_last, device=args.device)
    model = train(cfg, progress=True)
    path = save(model, args.output)
    prov = require_info(model, "this command").provenance
    print(f"saved {path}: validation {prov['val_accuracy']:.2f}%, test {prov['test_accuracy']:.2f}%")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data.tasks import parse_classes
    from .evaluation.metrics import accuracy, cost
    from .evaluation.protocol import input_shape, test_accuracy
    device = _device(args)
    model = _source(args, device)
    info = require_info(model, "this command")
    if args.stream:
        if info.kind == "assembly" or info.input is None:
            raise UserError("--stream evaluates a model or component on one image folder; assemblies read their "
                            "own datasets (evaluate them without --stream)")
        from .data.stream import StreamedBatches
        folder = _streamed(model, args, args.split).dataset  # listed once, read once per score
        data_name, class_names = "imagefolder", folder.classes
        shape = (info.input.channels, *info.input.size)

        def score(task: list[int], restrict: bool):
            it = StreamedBatches(folder, 256, workers=args.workers, classes=task)
            return accuracy(model, it, classes=task, restrict=restrict)
    else:
        if info.kind == "assembly":  # its outputs are union-task indices, not --data's labels: relabel
            from .data import load_dataset
            from .data.union import union_dataset
            given = {}
            if args.data:
                d = _dataset(args)
                given[d.name] = d
            ds = union_dataset(model, given, loader=lambda name: load_dataset(name, args.data_dir, download=args.download))
        elif args.data:
            ds = _dataset(args)
        else:
            raise UserError("give --data NAME (only assemblies know their datasets)")
        data_name, class_names, shape = ds.name, ds.classes, input_shape(model, ds)

        def score(task: list[int], restrict: bool):
            return test_accuracy(model, ds, task, restrict=restrict, split=args.split)
    classes = parse_classes(args.classes, class_names) if args.classes else list(info.classes)
    result: dict[str, object] = {"model": str(args.model), "kind": info.kind, "arch": info.arch,
                                 "dataset": data_name, "split": args.split, "classes": classes}
    acc = score(classes, False)
    result["accuracy"] = acc.to_json()
    if set(classes) != set(info.classes):  # a task inside the model's classes: add the fair baseline
        result["masked_accuracy"] = score(classes, True).to_json()
    c = cost(model, shape)
    result["cost"] = c.to_json()
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{info.kind} {info.arch} on {data_name} ({args.split}), classes {classes}")
    print(f"  accuracy: {acc.overall:.2f}% overall, {acc.mean_per_class:.2f}% mean per class, worst class {acc.worst_class:.2f}%")
    if "masked_accuracy" in result:
        m = result["masked_accuracy"]
        assert isinstance(m, dict)  # Accuracy.to_json()
        print(f"  masked to the task (argmax over its classes only): {m['mean_per_class']:.2f}% mean per class")
    names = dict(zip(range(len(class_names)), class_names))
    for k, v in acc.per_class.items():
        print(f"    {k:>4} {names.get(k, k)!s:<14} {v:6.2f}%  ({acc.counts[k]} images)")
    print(f"  parameters {c.params:,}  FLOPs {c.flops:,}  latency {c.latency_ms:.3f} ms (batch {c.batch}, {c.device})")
    return 0


def _profile_from_args(model, args: argparse.Namespace, classes=None, *, keep_contributions: bool = False,
                       group=None):
    from .core.distributed import world
    from .core.profiling import profile
    from .core.samples import SelectionConfig
    from .data import batches
    from .evaluation.protocol import model_transform
    if getattr(args, "stream", False):
        it = _streamed(model, args, group=group)
    else:
        ds = _dataset(args)
        rank, size = world(group)
        train = ds.train if size == 1 else ds.train.select(torch.arange(rank, len(ds.train), size))  # this process's shard
        it = batches(train, 256, transform=model_transform(model, ds), device=next(model.parameters()).device)
    selection = SelectionConfig(args.fraction, args.min_per_class, args.max_per_class, args.hold_budget)
    return profile(model, it, classes=classes, thresholds=_thresholds(args), mode=args.mode, select=selection,
                   progress=True, keep_contributions=keep_contributions, kernel=args.kernel, group=group,
                   memory_budget=args.memory_budget)


@contextlib.contextmanager
def _launched_group(device: torch.device) -> Iterator[tuple[ProcessGroup | None, torch.device]]:
    """The process group of a launch by torchrun (WORLD_SIZE > 1), or None: gloo between CPU
    processes, NCCL between GPU processes, one GPU each (LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        yield None, device
        return
    import torch.distributed as dist
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    except (ValueError, RuntimeError) as e:  # e.g. WORLD_SIZE set by hand, without torchrun's rendezvous
        raise UserError(f"WORLD_SIZE is {os.environ['WORLD_SIZE']}, but the process group did not start ({e}); "
                        "launch with torchrun, or unset WORLD_SIZE") from e
    try:
        yield dist.group.WORLD, device
    finally:
        dist.destroy_process_group()


def cmd_profile(args: argparse.Namespace) -> int:
    from .core.distributed import world
    with _launched_group(_device(args)) as (group, device):
        model = _source(args, device)
        prof = _profile_from_args(model, args, keep_contributions=args.keep_contributions, group=group)
        if world(group)[0] != 0:
            return 0  # every process holds the same profile; the first writes it
    path = prof.save(args.output)
    sel = prof.provenance["selection"]["selected"]
    print(f"saved {path}: {len(prof.classes)} classes, {len(prof.layers)} layers, "
          f"{sum(sel.values())} samples ({min(sel.values())}-{max(sel.values())} per class)")
    if prof.provenance["short"]:
        print(f"warning: classes with few correct samples: {prof.provenance['short']}")
    return 0


def cmd_disassemble(args: argparse.Namespace) -> int:
    from .core.distributed import world
    from .cut.disassemble import disassemble
    from .data.tasks import parse_classes
    from .evaluation.metrics import count_params
    from .files import save
    # Under torchrun the processes share the profiling and the calibration; the first writes.
    with _launched_group(_device(args)) as (group, device):
        model = _source(args, device)
        info = require_info(model, "this command")
        classes = parse_classes(args.classes, info.class_names)
        faithful_note = args.calibrate is None and not args.data
        if args.calibrate not in (None, "none") and not args.data:
            raise UserError("calibration needs training images: give --data NAME, or --calibrate none for the faithful cut")
        prof = _profile_for(model, args, classes, keep_contributions=args.flops is not None, group=group)
        method, calibration = _calibration(model, args, [info.classes[c] for c in classes], group=group)
        component = disassemble(model, classes, profile=prof, calibration=calibration, calibrate=method,
                                flops=args.flops, budget_rank=args.budget_rank, progress=True, group=group)
        if world(group)[0] != 0:
            return 0
    path = save(component, args.output)
    budget = require_info(component, "this command").provenance.get("flops_budget")
    print(f"saved {path}: classes {[info.class_names[c] for c in classes]}, "
          f"{count_params(component):,} of {count_params(model):,} parameters"
          + (f", {budget['flops_ratio']:.1%} of the FLOPs (every layer keeps {budget['keep_fraction']:.1%} "
             "of its inputs)" if budget else ""))
    if faithful_note:
        print("note: no --data, so no calibration: this is the paper's faithful cut", file=sys.stderr)
    return 0


def _calibration(model, args: argparse.Namespace, labels, group=None) -> tuple[str, list | None]:
    """The calibration method and this process's share of the training batches that --calibrate /
    --data ask for (all of them in one process)."""
    from .calibration.calibrate import DEFAULT_CALIBRATION
    from .core.distributed import batch_share, world
    method = args.calibrate if args.calibrate is not None else (DEFAULT_CALIBRATION if args.data else "none")
    if method == "none":
        return method, None
    if not args.data:
        raise UserError("calibration needs training images: give --data NAME, or --calibrate none for the faithful cut")
    if getattr(args, "stream", False):  # one pass over the task's images only, keeping a seeded draw
        from .calibration.draw import CalibrationDraw
        draw = CalibrationDraw(labels, args.calibration_images, shard=world(group))
        for x, y in _streamed(model, args, classes=labels, group=group):
            draw.update(x, y)
        draw.reduce(group)  # every process holds the whole draw
        return method, batch_share(draw.batches(), group)
    from .evaluation.protocol import calibration_batches
    return method, batch_share(calibration_batches(model, _dataset(args), labels, images=args.calibration_images), group)


def cmd_merge(args: argparse.Namespace) -> int:
    from .cut.merge import merge
    from .evaluation.metrics import count_params
    from .files import load, save
    device = _device(args)
    source = load(args.source, map_location=device)
    components = [load(p, map_location=device) for p in args.components]
    labels = list(dict.fromkeys(c for comp in components for c in require_info(comp, "this command").classes))
    method, calibration = _calibration(source, args, labels)
    merged = merge(source, components, calibration=calibration, calibrate=method, progress=True)
    path = save(merged, args.output)
    print(f"saved {path}: classes {list(require_info(merged, 'this command').class_names)}, {count_params(merged):,} parameters "
          f"(components: {', '.join(f'{count_params(c):,}' for c in components)}), calibration {method}")
    return 0


def cmd_assemble(args: argparse.Namespace) -> int:
    from .assembly.assemble import assemble
    from .assembly.scaling import scale_assembly
    from .core.distributed import batch_share, world
    from .data import load_dataset
    from .data.union import union_dataset
    from .evaluation.protocol import scaling_batches
    from .files import load, save
    from .training.fit import finetune
    if len(args.components) < 2:
        raise UserError("assembling needs at least two components")
    # Under torchrun the processes share the scaling images (logits and features gathered); the first writes.
    with _launched_group(_device(args)) as (group, device):
        rank, size = world(group)
        if args.finetune_epochs and size > 1:
            raise UserError("fine-tuning runs in one process: launch without torchrun, or scale only")
        components = [load(p, map_location=device) for p in args.components]
        nested = [p for p, c in zip(args.components, components) if require_info(c, "assemble").kind == "assembly"]
        if nested:
            raise UserError(f"{nested[0]} is an assembly; assemble its components together with the others instead")
        asm = assemble(components, mode=args.mode)
        info = require_info(asm, "this command")
        if args.scaling != "none" or args.finetune_epochs:
            ds = union_dataset(asm, loader=lambda name: load_dataset(name, args.data_dir, download=args.download))
            if args.finetune_epochs:  # first, so that the head is fitted to the network it will sit on
                finetune(asm, ds, epochs=args.finetune_epochs, lr=args.lr, device=device)
            if args.scaling != "none":
                drawn = scaling_batches(asm, ds, per_class=args.images_per_class)
                scale_assembly(asm, batch_share(drawn, group), args.scaling, group=group)
        if rank != 0:
            return 0
    path = save(asm, args.output)
    mode = info.assembly.mode if info.assembly else "?"
    print(f"saved {path}: {mode} assembly of {len(components)} components, "
          f"{len(info.classes)} classes ({', '.join(info.class_names)}), scaling {args.scaling}")
    return 0


def _profile_for(model, args: argparse.Namespace, classes=None, *, keep_contributions: bool = False, group=None):
    """The profile given by --profile (checked against the model's weights) or computed from --data."""
    from .core.locate import Thresholds
    from .core.profiling import Profile
    from .io.info import weights_hash
    if args.profile:
        if _thresholds(args) != Thresholds():
            raise UserError("the thresholds are those the profile was made with; re-profile to change them")
        prof = Profile.load(args.profile)
        if prof.model_sha256 not in (None, weights_hash(model.state_dict())):
            raise UserError(f"the profile {args.profile} was computed from another model (weights hash differs); "
                            "re-profile this model")
        return prof
    if args.data:
        return _profile_from_args(model, args, classes, keep_contributions=keep_contributions, group=group)
    raise UserError("give --profile PROFILE or --data NAME to profile the model first")


def cmd_routes(args: argparse.Namespace) -> int:
    from .apps.routes import RouteAnalysis, sample_routes
    from .apps.routes.plots import FORMATS, sample_figure, save_figure
    from .apps.routes.report import describe_sample, write_route_report
    from .data import batches
    from .data.tasks import parse_classes
    from .evaluation.protocol import model_transform
    from .files import load
    model = load(args.model, map_location=_device(args))
    info = require_info(model, "this command")
    if args.sample is not None and not args.data:
        raise UserError("--sample needs --data NAME: the image comes from that dataset")
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    if not formats or any(f not in FORMATS for f in formats):
        raise UserError(f"--format takes {', '.join(FORMATS)}, comma-separated; got {args.format!r}")
    prof = _profile_for(model, args)
    analysis = RouteAnalysis.from_profile(prof)
    if args.sample is None:
        classes = parse_classes(args.classes, info.class_names) if args.classes else None
        paths = write_route_report(analysis, args.output, classes=classes, formats=formats)
        print("wrote " + ", ".join(str(p) for p in paths))
        return 0
    ds = _dataset(args)
    split = getattr(ds, args.split)
    if not 0 <= args.sample < len(split):
        raise UserError(f"--sample {args.sample} is out of range: the {args.split} split has {len(split)} images")
    x, _ = next(iter(batches(split.select(torch.tensor([args.sample])), 1, transform=model_transform(model, ds))))  # (1, C, H, W)
    routes = sample_routes(model, x.to(next(model.parameters()).device), thresholds=prof.thresholds)
    label = int(split.labels[args.sample])
    true_class = label if label in analysis.classes else None
    print("\n".join(describe_sample(routes, 0, analysis, true_class)))
    path = save_figure(sample_figure(routes, 0, analysis, true_class=true_class, image=x[0]), args.output)
    print(f"wrote {path}")
    return 0


def _train_student(args: argparse.Namespace, teachers, tasks) -> int:
    """Amalgamate (several teachers) or distill (one) with the flags of `_student_args`; save and report."""
    from .apps.amalgamate import amalgamate, distill, task_teacher
    from .data import load_dataset
    from .data.tasks import parse_classes
    from .evaluation.metrics import count_params
    from .files import save
    from .training.fit import FitConfig
    if tasks is not None:
        if len(tasks) != len(teachers):
            raise UserError(f"--classes takes one task per teacher: {len(teachers)} teachers, {len(tasks)} tasks")
        teachers = [task_teacher(t, parse_classes(spec, require_info(t, "this command").class_names))
                    for t, spec in zip(teachers, tasks)]
    config = FitConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    kwargs = dict(student=args.student, width=args.width, config=config, temperature=args.temperature,
                  images=args.images, resize=args.resize, device=_device(args),
                  loader=lambda name: load_dataset(name, args.data_dir, download=args.download))
    student = amalgamate(teachers, **kwargs) if args.command == "amalgamate" else distill(teachers[0], **kwargs)
    path = save(student, args.output)
    info = require_info(student, "this command")
    rec = info.provenance["amalgamation"]
    val = (f"validation distillation loss {rec['val_loss']:.4f}, mean per-class accuracy {rec['val_accuracy']:.2f}%"
           if rec["val_loss"] is not None else "no validation images")
    print(f"saved {path}: {rec['student']['arch']} w{rec['student']['width']:g} student of {len(teachers)} "
          f"teacher{'s' if len(teachers) > 1 else ''}, {len(info.classes)} classes ({', '.join(info.class_names)}), "
          f"{count_params(student):,} parameters; best epoch {rec['best_epoch']}: {val}; {rec['seconds']:.0f} s")
    return 0


def cmd_amalgamate(args: argparse.Namespace) -> int:
    from .files import load
    if len(args.teachers) < 2:
        raise UserError(f"amalgamate needs at least two teachers, got {len(args.teachers)}; "
                        "use `modellego distill` for one")
    device = _device(args)
    return _train_student(args, [load(p, map_location=device) for p in args.teachers], args.classes)


def cmd_distill(args: argparse.Namespace) -> int:
    from .files import load
    teacher = load(args.teacher, map_location=_device(args))
    return _train_student(args, [teacher], [args.classes] if args.classes else None)


def cmd_compress(args: argparse.Namespace) -> int:
    from .apps.compress import compress_sweep, markdown_table, tradeoff_figure
    from .apps.figures import save_figure
    from .core.samples import SelectionConfig
    from .files import load, save
    from .io.atomic import write_json, write_text
    model = load(args.model, map_location=_device(args))
    budgets = args.flops or []
    rows, models = compress_sweep(
        model, _dataset(args), budgets, paper=args.paper or not budgets, calibrate=args.calibrate,
        calibration_images=args.calibration_images, finetune_epochs=args.finetune_epochs, progress=True,
        thresholds=_thresholds(args), mode=args.mode, kernel=args.kernel,
        select=SelectionConfig(args.fraction, args.min_per_class, args.max_per_class))
    table = markdown_table(rows)
    if len(models) == 1:
        print(f"saved {save(models[0], args.output)}")
    else:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        for row, m in zip(rows[1:], models):
            save(m, out / ("paper.safetensors" if row.budget is None else f"flops-{row.budget:g}.safetensors"))
        write_json(out / "compress.json", [r.to_json() for r in rows])
        write_text(out / "compress.md", table)
        save_figure(tradeoff_figure(rows, f"{Path(args.model).stem} on {args.data}"), out / "compress.png")
        print(f"saved {len(models)} models, compress.json, compress.md and compress.png in {out}")
    print(table, end="")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(Path(args.cache), epochs=args.epochs, device=_device(args))


COMMANDS = {"models": cmd_models, "train": cmd_train, "evaluate": cmd_evaluate, "profile": cmd_profile,
            "disassemble": cmd_disassemble, "assemble": cmd_assemble, "merge": cmd_merge, "routes": cmd_routes,
            "demo": cmd_demo, "amalgamate": cmd_amalgamate, "distill": cmd_distill, "compress": cmd_compress}


INPUT_ARGS = ("model", "profile", "source", "teacher", "components", "teachers", "weights")
FILE_OUTPUTS = {"profile"}  # commands whose -o is one file, never a folder


def _check_output(args: argparse.Namespace) -> None:
    """Refuse, before any work, an output that cannot be written or would overwrite an input."""
    output = getattr(args, "output", None)
    if output is None:
        return
    if not str(output).strip():
        raise UserError("the output path (-o) is empty")
    from .io.checkpoint import resolve_path
    out = Path(output)
    targets = {out.resolve(), resolve_path(out).resolve()}
    for name in INPUT_ARGS:
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value and targets & {Path(value).resolve(), resolve_path(value).resolve()}:
                raise UserError(f"the output {output} is also an input ({name}); write somewhere else")
    if args.command in FILE_OUTPUTS and out.is_dir():
        raise UserError(f"{output} is a folder; give a file name")
    anchor = out.parent.resolve() if args.command in FILE_OUTPUTS or out.suffix else out.resolve()
    while not anchor.exists():  # the folders still to be made hang under the nearest existing one
        anchor = anchor.parent
    if not anchor.is_dir():
        raise UserError(f"cannot write {output}: {anchor} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {output}: {anchor} is not writable")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (user errors: one line on stderr, status 2)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        if e.code in (0, None):  # --help, --version
            raise
        return int(e.code) if isinstance(e.code, int) else 2  # a bad command line, already printed on one line
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        _check_output(args)
        return COMMANDS[args.command](args)
    except (UserError, ModellegoError) as e:
        print(f"modellego {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the disk, not the program: full, read-only, gone
        where = f": {e.filename}" if e.filename else ""
        print(f"modellego {args.command}: error: {e.strerror or e}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
