"""Profiling and calibration over a streamed ImageNet-layout folder of 1000 classes, against a plain
forward pass over the same loader, as the folder grows, in one process and in two (torchrun).

The folder is generated (seeded JPEGs, `train/<class>/*.JPEG`, 1000 classes; each class has its
own background gradient and three coloured shapes, each image jitters them, rescales, adds noise
and has its own size and aspect) and cached under .cache/stream_scale/, keyed by its size. The
models are zoo models at full width with 1000 outputs: a random-initialised trunk (seeded) and a
head fitted in closed form (a ridge probe on the trunk's features of 3 renders per class that are
not in the folder), so that the model classifies most images correctly and the profile's sample
selection keeps what it would keep with a trained model (random weights classify almost none).

Every measurement is a fresh process, so its peak resident memory is its own; each reads the
folder with `StreamedBatches` (the loader of `modellego profile --stream`), same batch size and
workers:

- forward: the model over every image (no_grad), nothing else;
- profile: `modellego.profile` over the streamed batches, as `modellego profile --stream` calls it
  (selection pass, contributions of the selected images, locating 1000 classes), with a fixed
  `memory_budget` for the contribution sums;
- calibrate: what `modellego disassemble --stream --profile P` does for a task: one pass over the
  task's images drawing the calibration images, then `disassemble` with recon+balance;
- profile and calibrate under `torchrun --standalone --nproc-per-node 2` (gloo, one thread each):
  the profile's masks are compared entry by entry with the one-process profile of the same folder,
  the component's logits on its task's images with the one-process component's.

    # BENCHMARKS.md 2.8, this 2-core CPU (32x32, 2,000 and 8,000 images, the first 10 classes profiled):
    python benchmarks/stream_scale.py --models vgg16_bn:32 --images-per-class 2 8 --profile-classes 10 --task-classes 8
    python benchmarks/stream_scale.py --models resnet50:32 --images-per-class 2 --profile-classes 10 --task-classes 8 \\
        --methods profile calibrate --processes 1        # and the same with --methods forward
    # The issue's setting, on a GPU machine (5k and 20k images of 224x224, every class; two processes need two GPUs):
    python benchmarks/stream_scale.py --models resnet50 vgg16_bn --size 224 --images-per-class 5 20 \\
        --workers 8 --device cuda

A model is `NAME` or `NAME:SIZE` (input side; default --size). `--profile-classes N` keeps the
selection pass whole (every image through the full head) but computes contributions and locates
only classes 0..N-1: locating costs a few passes over every weight per class, whatever the number
of images, which on a CPU dominates a 1000-class profile of a small folder. Rows go to
benchmarks/results/stream_scale.jsonl.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402

GENERATOR = 1
"""Version of the image generator and of the probe head: part of every cache key."""
CACHE = Path(".cache/stream_scale")
PROBE_RENDERS = 3  # per class: the clean design and two jittered renders, none of them in the folder
PROBE_SEED = 1_000_003  # the probe's renders come from another random stream than the folder's
RIDGE = 0.1  # ridge penalty per sample, on standardised features


# ----------------------------------------------------------------------------------------------
# The folder


def class_name(c: int) -> str:
    return f"n{c:08d}"  # ImageNet-like wnid


def _design(c: int, seed: int) -> dict:
    """What class `c` looks like: a two-colour gradient at an angle and three shapes."""
    r = np.random.default_rng([seed, c])
    shapes = [{"ellipse": bool(r.integers(2)), "colour": tuple(int(v) for v in r.integers(0, 256, 3)),
               "cx": r.uniform(0.2, 0.8), "cy": r.uniform(0.2, 0.8), "rx": r.uniform(0.1, 0.3), "ry": r.uniform(0.1, 0.3)}
              for _ in range(3)]
    return {"background": r.integers(0, 256, (2, 3)), "angle": r.uniform(0, np.pi), "shapes": shapes}


def render(c: int, seed: int, side: int, rng: np.random.Generator | None):
    """One RGB image of class `c`: its design, jittered, resized, brightened and noised by `rng`
    (None: the clean design, 1.2 x `side` wide). Its shorter side is about `side`."""
    from PIL import Image, ImageDraw

    d = _design(c, seed)
    if rng is None:
        w, h = round(1.2 * side), side
    else:
        short = max(8, round(side * rng.uniform(0.9, 1.1)))
        long = round(short * rng.uniform(1.0, 1.4))
        w, h = (long, short) if rng.uniform() < 0.75 else (short, long)  # mostly landscape, as ImageNet
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)  # (h, w) each
    g = np.cos(d["angle"]) * xx + np.sin(d["angle"]) * yy
    g = ((g - g.min()) / max(float(np.ptp(g)), 1e-6))[..., None]  # (h, w, 1)
    pixels = d["background"][0] * (1 - g) + d["background"][1] * g  # (h, w, 3)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for s in d["shapes"]:
        jx, jy, js = (0.0, 0.0, 1.0) if rng is None else (rng.normal(0, 0.04), rng.normal(0, 0.04), rng.uniform(0.9, 1.1))
        cx, cy, rx, ry = (s["cx"] + jx) * w, (s["cy"] + jy) * h, s["rx"] * js * w, s["ry"] * js * h
        (draw.ellipse if s["ellipse"] else draw.rectangle)([cx - rx, cy - ry, cx + rx, cy + ry], fill=s["colour"])
    if rng is not None:
        noisy = np.asarray(image, dtype=np.float32) * rng.uniform(0.85, 1.15) + rng.normal(0, 8, (h, w, 3))
        image = Image.fromarray(noisy.clip(0, 255).astype(np.uint8))
    return image


def folder_path(cache: Path, classes: int, per_class: int, side: int, seed: int) -> Path:
    return cache / f"imagenet-{classes}x{per_class}-side{side}-seed{seed}-v{GENERATOR}"


def make_folder(cache: Path, classes: int, per_class: int, side: int, seed: int = 0) -> Path:
    """The folder of `classes` x `per_class` JPEGs (quality 90), generated once and reused.

    Image `i` of class `c` is seeded by (seed, c, i), so a larger folder holds the smaller ones' images.
    """
    root = folder_path(cache, classes, per_class, side, seed)
    if (root / "done.json").is_file():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    t = time.perf_counter()
    for c in range(classes):
        out = partial / "train" / class_name(c)
        out.mkdir(parents=True)
        for i in range(per_class):
            image = render(c, seed, side, np.random.default_rng([seed, c, i]))
            image.save(out / f"{class_name(c)}_{i}.JPEG", "JPEG", quality=90)
    (partial / "done.json").write_text(json.dumps({"classes": classes, "per_class": per_class, "side": side,
                                                   "seed": seed, "generator": GENERATOR}) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(partial, root)  # whole or absent
    print(f"generated {root} ({classes * per_class:,} images) in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    return root


def folder_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "train").rglob("*.JPEG"))


# ----------------------------------------------------------------------------------------------
# The model


def model_path(cache: Path, name: str, size: int, classes: int, side: int, seed: int) -> Path:
    return cache / "models" / f"{name.replace(':', '-')}-{size}px-{classes}-side{side}-seed{seed}-v{GENERATOR}.safetensors"


@torch.no_grad()
def prepare_model(name: str, size: int, classes: int, side: int, seed: int, device: str, path: Path) -> None:
    """A zoo model with a seeded random trunk and a ridge-probe head, saved with its input spec."""
    from PIL import Image

    from modellego.data.stream import CROP_FRACTION, IMAGENET_MEAN, IMAGENET_STD, eval_transform
    from modellego.files import save
    from modellego.hooks import forward_hooks
    from modellego.io.info import InputSpec, get_info, set_info
    from modellego.models import create_model
    from modellego.models.registry import classifier_layer

    dev = torch.device(device)
    torch.manual_seed(seed)
    model = create_model(name, num_classes=classes, in_channels=3).to(dev).eval()
    head_name, head = classifier_layer(model)
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def sample(c: int, k: int) -> torch.Tensor:
        rng = None if k == 0 else np.random.default_rng([seed + PROBE_SEED, c, k])
        buf = io.BytesIO()
        render(c, seed, side, rng).save(buf, "JPEG", quality=90)  # read as the folder's files are
        with Image.open(buf) as img:
            rgb = img.convert("RGB")
        return eval_transform(rgb, size=size, resize=round(size / CROP_FRACTION), mean=mean, std=std)  # (3, S, S)

    labels = torch.arange(classes).repeat(PROBE_RENDERS)  # (N,)
    feats: list[torch.Tensor] = []
    got: dict[str, torch.Tensor] = {}
    with forward_hooks(model, {head_name: lambda m, args: got.__setitem__("x", args[0].detach().double().cpu())}, pre=True):
        for i in range(0, len(labels), 256):
            x = torch.stack([sample(j % classes, j // classes) for j in range(i, min(i + 256, len(labels)))])
            model(x.to(dev))  # (B, 3, S, S)
            feats.append(got["x"])
    f = torch.cat(feats)  # (N, D)
    mu, sd = f.mean(0), f.std(0) + 1e-6
    z = (f - mu) / sd  # (N, D)
    onehot = torch.nn.functional.one_hot(labels, classes).double()  # (N, classes)
    w = torch.linalg.solve(z.T @ z + RIDGE * len(z) * torch.eye(z.shape[1], dtype=z.dtype), z.T @ onehot)  # (D, classes)
    head.weight.copy_((w / sd[:, None]).T.float())  # logits = ((f - mu) / sd) @ w
    head.bias.copy_((-(mu / sd) @ w).float())
    train_acc = float(((z @ w).argmax(1) == labels).double().mean())
    info = get_info(model)
    assert info is not None  # create_model attaches one
    set_info(model, info.replace(
        class_names=tuple(class_name(c) for c in range(classes)), dataset="imagefolder",
        input=InputSpec(3, (size, size), tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)),
        provenance={"trunk": f"random init, torch.manual_seed({seed})",
                    "head": f"ridge probe on {PROBE_RENDERS} renders per class (benchmarks/stream_scale.py v{GENERATOR})",
                    "probe_accuracy": round(100 * train_acc, 2)}))
    path.parent.mkdir(parents=True, exist_ok=True)
    save(model.cpu(), path)


# ----------------------------------------------------------------------------------------------
# One measurement (in its own process)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _peak_bytes(who: int = resource.RUSAGE_SELF) -> int:
    return resource.getrusage(who).ru_maxrss * 1024  # RUSAGE_CHILDREN: the largest finished child (a loader worker)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def _group(device: str):
    """torchrun's process group (gloo on CPU, NCCL with one GPU per process), or None in one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None, torch.device(device)
    import torch.distributed as dist

    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return dist.group.WORLD, dev


def measure(kind: str, args: argparse.Namespace) -> dict:
    from modellego.core.distributed import world
    from modellego.evaluation.protocol import model_stream
    from modellego.files import load

    group, dev = _group(args.device)
    rank, processes = world(group)
    model = load(args.model_file, map_location=dev)
    labels = None
    if kind == "calibrate":  # the task: the first classes that have a route (a correctly classified image)
        from modellego.core.profiling import Profile

        prof = Profile.load(args.profile_file)
        missing = set(prof.provenance["missing"])
        labels = [c for c in prof.classes if c not in missing][:args.task_classes]
    t = time.perf_counter()
    stream = model_stream(model, args.folder, batch_size=args.batch, workers=args.workers, shard=(rank, processes),
                          classes=labels)
    listing = time.perf_counter() - t
    with torch.no_grad():  # warm-up, and the model's own buffers, before the baseline footprint
        model(torch.zeros(8, *stream.dataset[0][0].shape, device=dev))  # (8, 3, S, S)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    base = _rss_bytes()
    row: dict = {}
    t = time.perf_counter()
    if kind == "forward":
        images = 0
        with torch.no_grad():
            for x, y in stream:
                model(x.to(dev))
                images += len(y)
    elif kind == "profile":
        from modellego.core.profiling import profile
        from modellego.core.samples import SelectionConfig

        hold = None if args.hold_budget is None else int(args.hold_budget * 2**20)
        select = SelectionConfig(args.fraction, args.min_per_class, args.max_per_class, hold)
        classes = None if args.profile_classes is None else list(range(args.profile_classes))
        prof = profile(model, stream, classes=classes, select=select, memory_budget=int(args.memory_budget * 2**20),
                       device=dev, group=group)
        sel = prof.provenance["selection"]
        images = len(stream.selected)  # every process's count: the profile reads all shards
        row = {"select_s": prof.provenance["seconds"]["select"],
               "contributions_s": prof.provenance["seconds"]["contributions_and_locating"],
               "seen": sum(sel["seen"].values()), "correct": sum(sel["correct"].values()),
               "selected": sum(sel["selected"].values()), "missing": len(prof.provenance["missing"]),
               "short": len(prof.provenance["short"])}
    else:
        from modellego.calibration.draw import CalibrationDraw
        from modellego.core.distributed import batch_share
        from modellego.cut.disassemble import disassemble
        from modellego.evaluation.metrics import count_params

        assert labels is not None
        draw = CalibrationDraw(labels, args.calibration_images, shard=(rank, processes))
        images = 0
        for x, y in stream:  # what `disassemble --stream` does: one pass over the task's images
            draw.update(x, y)
            images += len(y)
        draw.reduce(group)
        images = draw.seen  # every process's: the calibration covers all shards
        t_draw = time.perf_counter() - t
        component = disassemble(model, labels, profile=prof, calibration=batch_share(draw.batches(), group),
                                calibrate=args.calibrate, group=group)
        row = {"task_classes": labels, "calibrate": args.calibrate, "calibration_images": images,
               "draw_s": round(t_draw, 3), "params": count_params(component), "source_params": count_params(model)}
    _sync(dev)
    seconds = time.perf_counter() - t
    del stream  # its workers have finished; the largest of them is in RUSAGE_CHILDREN
    if kind == "profile" and rank == 0:
        prof.save(args.profile_out)
    if kind == "calibrate" and rank == 0 and args.component_out:
        from modellego.files import save

        save(component, args.component_out)
    out = {"kind": kind, "rank": rank, "processes": processes, "threads": torch.get_num_threads(), "device": str(dev),
           "images": images, "seconds": seconds, "listing_s": round(listing, 3), "base_rss_mib": round(base / 2**20),
           "peak_rss_mib": round(_peak_bytes() / 2**20), "worker_peak_rss_mib": round(_peak_bytes(resource.RUSAGE_CHILDREN) / 2**20),
           **row}
    if dev.type == "cuda":
        out["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    if group is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return out


# ----------------------------------------------------------------------------------------------
# The runs


def _child(cmd: list[str], env: dict[str, str] | None = None) -> tuple[list[dict], float]:
    """Run `cmd`; return the JSON rows it printed (one per process) and its wall time."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line[len("ROW "):]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    return rows, wall


def _one(kind: str, model_file: Path, folder: Path, args: argparse.Namespace, extra: list[str],
         processes: int = 1) -> tuple[list[dict], float]:
    cmd = [__file__, "--one", kind, "--model-file", str(model_file), "--folder", str(folder), "--batch", str(args.batch),
           "--workers", str(args.workers), "--device", args.device, "--fraction", str(args.fraction),
           "--min-per-class", str(args.min_per_class), "--max-per-class", str(args.max_per_class),
           "--memory-budget", str(args.memory_budget), *extra]
    for flag, value in (("--hold-budget", args.hold_budget), ("--profile-classes", args.profile_classes)):
        if value is not None:
            cmd += [flag, str(value)]
    if processes == 1:
        return _child([sys.executable, *cmd])
    threads = torch.get_num_threads()
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // processes)), GLOO_SOCKET_IFNAME="lo")
    return _child([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *cmd], env)


def same_masks(a_path: Path, b_path: Path) -> dict:
    from modellego.core.profiling import Profile

    a, b = Profile.load(a_path), Profile.load(b_path)
    same = torch.cat([(m[k] == n[k]).flatten() for m, n in ((a.in_masks, b.in_masks), (a.out_masks, b.out_masks))
                      for k in a.layers])
    return {"mask_entries": int(same.numel()), "mask_entries_equal": int(same.sum()),
            "same_selection": a.provenance["selection"] == b.provenance["selection"],
            "identical": bool(same.all()) and a.classes == b.classes}


def _slowest(ranks: list[dict], wall: float) -> dict:
    """One row for a torchrun launch: the slowest process's (it ends the pass), every process's peak."""
    r = max(ranks, key=lambda x: x["seconds"])
    return {**r, "peak_rss_mib": max(x["peak_rss_mib"] for x in ranks),
            "worker_peak_rss_mib": max(x["worker_peak_rss_mib"] for x in ranks),
            "rank_peak_rss_mib": [x["peak_rss_mib"] for x in sorted(ranks, key=lambda x: x["rank"])],
            "launch_s": round(wall, 2)}


@torch.no_grad()
def same_component(a_path: Path, b_path: Path, folder: Path) -> dict:
    """How far apart two components are: shapes, and their logits on the first 256 of their task's
    images, relative to the logits' scale (float32 sums in another order move them a little)."""
    from modellego.cut.disassemble import relative_error
    from modellego.evaluation.protocol import model_stream
    from modellego.files import load
    from modellego.io.info import require_info

    a, b = load(a_path), load(b_path)
    shapes = {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    x, _ = next(iter(model_stream(a, folder, batch_size=256, workers=0,
                                  classes=list(require_info(a, "stream_scale").classes))))
    return {"same_shapes": shapes, "logits_relative_error": float(relative_error(b(x).double(), a(x).double()))
            if shapes else None}


def parse_model(spec: str, size: int) -> tuple[str, int]:
    """`NAME`, `NAME:SIZE`, `timm:NAME` or `timm:NAME:SIZE` (and torchvision:)."""
    head, _, tail = spec.rpartition(":")
    return (head, int(tail)) if head and tail.isdigit() else (spec, size)


def run(args: argparse.Namespace) -> list[dict]:
    from modellego.evaluation.metrics import count_flops
    from modellego.files import load
    from modellego.io.info import require_info

    specs = [parse_model(m, args.size) for m in args.models]
    distributed_at = args.distributed_at if args.distributed_at is not None else args.images_per_class[:1]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in specs:
            side = args.side or round(1.25 * round(size / 0.875))  # stored shorter side: 1.25x the resize, ~1.4x the crop
            folders = {n: make_folder(args.cache, args.classes, n, side, args.seed) for n in args.images_per_class}
            path = model_path(args.cache, name, size, args.classes, side, args.seed)
            if not path.is_file():
                t = time.perf_counter()
                _child([sys.executable, __file__, "--prepare", name, str(size), "--classes", str(args.classes),
                        "--side", str(side), "--seed", str(args.seed), "--device", args.device, "--model-file", str(path)])
                print(f"prepared {path} in {time.perf_counter() - t:.0f} s", file=sys.stderr)
            model = load(path)
            gflops = count_flops(model, (3, size, size)) / 1e9
            common = {"model": name, "width": 1.0, "size": size, "stored_side": side, "classes": args.classes,
                      "batch": args.batch, "workers": args.workers, "torch": torch.__version__,
                      "gflops_per_image": round(gflops, 3),
                      "probe_accuracy": require_info(model, "stream_scale").provenance.get("probe_accuracy")}
            del model
            for n, folder in folders.items():
                base = {**common, "images_per_class": n, "folder_mib": round(folder_bytes(folder) / 2**20, 1)}
                stem = f"{name.replace(':', '-')}-{size}-{n}"
                prof1 = Path(tmp) / f"{stem}-1.safetensors"
                many = n in distributed_at and args.processes > 1
                for kind in args.methods:
                    if kind == "calibrate":
                        if not prof1.is_file():
                            continue
                        extra = ["--profile-file", str(prof1), "--task-classes", str(args.task_classes),
                                 "--calibration-images", str(args.calibration_images), "--calibrate", args.calibrate]
                        outs = [Path(tmp) / f"{stem}-component-{k}.safetensors" for k in (1, args.processes)]
                    else:
                        extra = ["--profile-out", str(prof1)]
                    (r,), _ = _one(kind, path, folder, args, extra + (["--component-out", str(outs[0])]
                                                                      if kind == "calibrate" else []))
                    rows.append(_finish({**base, "method": kind}, r, args))
                    if not many or kind == "forward":
                        continue
                    if kind == "profile":  # the same profile in several processes: compared mask for mask
                        prof2 = Path(tmp) / f"{stem}-{args.processes}.safetensors"
                        ranks, wall = _one("profile", path, folder, args, ["--profile-out", str(prof2)], args.processes)
                        same = same_masks(prof1, prof2)
                    else:  # the same calibration in several processes: compared output for output
                        ranks, wall = _one("calibrate", path, folder, args, extra + ["--component-out", str(outs[1])],
                                           args.processes)
                        same = same_component(*outs, folder)
                    rows.append(_finish({**base, "method": kind}, _slowest(ranks, wall), args, **same))
    return rows


def _finish(base: dict, r: dict, args: argparse.Namespace, **extra: object) -> dict:
    row = {**base, "processes": r["processes"], "threads": r["threads"], "device": r["device"], "images": r["images"],
           "seconds": round(r["seconds"], 2), "images_per_s": round(r["images"] / r["seconds"], 2),
           **{k: v for k, v in r.items() if k not in ("kind", "rank", "processes", "threads", "device", "images", "seconds")},
           **extra}
    if base["method"] == "profile":
        row.update(profile_classes=args.profile_classes or args.classes, fraction=args.fraction,
                   min_per_class=args.min_per_class, max_per_class=args.max_per_class,
                   memory_budget_mib=args.memory_budget, hold_budget_mib=args.hold_budget)
    record(row, args.out)
    return row


def print_table(rows: list[dict]) -> None:
    fwd = {(r["model"], r["size"], r["images_per_class"]): r for r in rows if r["method"] == "forward"}
    print("| model | px | images | method | processes | seconds | images/s | / forward | peak RSS MiB | selected | "
          "against 1 process |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = fwd.get((r["model"], r["size"], r["images_per_class"]))
        ratio = f"{r['images_per_s'] / f['images_per_s']:.2f}x" if f and r is not f else "-"
        masks = (f"{r['mask_entries_equal']:,} of {r['mask_entries']:,} mask entries equal" if "mask_entries" in r
                 else f"logits {r['logits_relative_error']:.1e} apart" if r.get("logits_relative_error") is not None
                 else "other shapes" if r.get("same_shapes") is False else "-")
        print(f"| {r['model']} | {r['size']} | {r['images']:,} | {r['method']} | {r['processes']} | {r['seconds']:.1f} | "
              f"{r['images_per_s']:.1f} | {ratio} | {r['peak_rss_mib']:,} | {r.get('selected', '-')} | {masks} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["resnet50:32", "vgg16_bn:32"], help="NAME or NAME:SIZE")
    p.add_argument("--size", type=int, default=224, help="input side of a model given without :SIZE")
    p.add_argument("--images-per-class", type=int, nargs="*", default=[2, 8])
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--side", type=int, default=None,
                   help="stored images' shorter side (default: 1.25 x each model's resize, 320 for 224)")
    p.add_argument("--methods", nargs="*", default=["forward", "profile", "calibrate"],
                   choices=["forward", "profile", "calibrate"])
    p.add_argument("--processes", type=int, default=2,
                   help="also profile and calibrate with this many torchrun processes (1: not)")
    p.add_argument("--distributed-at", type=int, nargs="*", default=None,
                   help="images per class at which to run --processes (default: the first)")
    p.add_argument("--batch", type=int, default=256, help="batch size (the CLI's --stream batch)")
    p.add_argument("--workers", type=int, default=2, help="DataLoader decoding processes (per process)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--fraction", type=float, default=0.01)
    p.add_argument("--min-per-class", type=int, default=5)
    p.add_argument("--max-per-class", type=int, default=256)
    p.add_argument("--memory-budget", type=float, default=2048,
                   help="MiB of contribution sums held at once (the library's default is half the free memory)")
    p.add_argument("--hold-budget", type=float, default=None,
                   help="MiB of selection candidates held before reading again (default: the library's)")
    p.add_argument("--profile-classes", type=int, default=None,
                   help="profile classes 0..N-1 only (the selection pass still reads every image; default: all)")
    p.add_argument("--task-classes", type=int, default=100, help="calibrate: the task is the first N profiled classes that have a route")
    p.add_argument("--calibration-images", type=int, default=2000)
    p.add_argument("--calibrate", default="recon+balance")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=CACHE)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/stream_scale.jsonl"))
    p.add_argument("--one", choices=["forward", "profile", "calibrate"], help=argparse.SUPPRESS)
    p.add_argument("--prepare", nargs=2, metavar=("MODEL", "SIZE"), help=argparse.SUPPRESS)
    for hidden in ("--model-file", "--folder", "--profile-file", "--profile-out", "--component-out"):
        p.add_argument(hidden, type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(m.startswith(("timm:", "torchvision:")) for m in [*args.models, *(args.prepare or [])]) or (
            args.model_file and "timm-" in args.model_file.name or args.model_file and "torchvision-" in args.model_file.name):
        # The known torchvision-wheel workaround: the tests' helper imports timm/torchvision without their C ops.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        import vision_models

        vision_models.load("timm")
    if args.prepare:
        prepare_model(args.prepare[0], int(args.prepare[1]), args.classes, args.side, args.seed, args.device,
                      args.model_file)
        return 0
    if args.one:
        print("ROW " + json.dumps(measure(args.one, args)), flush=True)
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    rows = run(args)
    print(f"\n{args.device}, {torch.get_num_threads()} threads, torch {torch.__version__}, batch {args.batch}, "
          f"{args.workers} workers, {args.classes} classes")
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
