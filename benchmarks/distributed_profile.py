"""`modellego profile` in one process against the same command under torchrun, on a zoo model and
its real training set: do the profiles agree, and what does each take?

Each run is the command line as a user types it, in a fresh process (start-up and the selection
pass over the whole training set included). The torchrun processes split the machine's threads
between them, so on one machine this shows the overhead of the collectives, not a speed-up;
the speed-up comes from more machines or GPUs.

    python benchmarks/distributed_profile.py                        # VGG-16-BN, MNIST, 2 processes
    python benchmarks/distributed_profile.py --models lenet5 resnet18 --processes 2

Rows go to benchmarks/results/distributed_profile.jsonl.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import record  # noqa: E402
from train_zoo import checkpoint_path, get_model  # noqa: E402

from modellego.core.profile import Profile  # noqa: E402


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t


def run(model_name: str, data: str, processes: int, args: argparse.Namespace, tmp: Path) -> dict:
    get_model(args.cache, model_name, data)  # trained and cached first if missing
    ckpt = str(checkpoint_path(args.cache, model_name, data))
    threads = torch.get_num_threads()
    base = ["profile", ckpt, "--data", data, "--device", "cpu"]
    one, many = tmp / f"{model_name}-1.safetensors", tmp / f"{model_name}-{processes}.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    t_one = timed([sys.executable, "-m", "modellego.cli", *base, "-o", str(one)], env)
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, threads // processes)), GLOO_SOCKET_IFNAME="lo")
    t_many = timed([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
                    "-m", "modellego.cli", *base, "-o", str(many)], env)
    a, b = Profile.load(one), Profile.load(many)
    masks = [(a.in_masks[k] == b.in_masks[k]).flatten() for k in a.layers]
    masks += [(a.out_masks[k] == b.out_masks[k]).flatten() for k in a.layers]
    same = torch.cat(masks)
    return {"model": model_name, "data": data, "processes": processes, "threads": threads, "device": "cpu",
            "torch": torch.__version__,
            "one_process_s": round(t_one, 2), "torchrun_s": round(t_many, 2),
            "ratio": round(t_many / t_one, 2),
            "same_selection": a.provenance["selection"] == b.provenance["selection"],  # the counts per class
            "mask_entries": int(same.numel()), "mask_entries_equal": int(same.sum()),
            "identical": bool(same.all()) and a.classes == b.classes}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["vgg16_bn"])
    p.add_argument("--data", default="mnist")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--cache", type=Path, default=Path(".cache/zoo"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/distributed_profile.jsonl"))
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(run(name, args.data, args.processes, args, Path(tmp)))
            record(rows[-1], args.out)
    print("\n| model | data | processes | one process s | torchrun s | ratio | same selection counts | masks equal |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['data']} | {r['processes']} | {r['one_process_s']} | {r['torchrun_s']} | "
              f"{r['ratio']}x | {'yes' if r['same_selection'] else 'no'} | "
              f"{r['mask_entries_equal']:,} of {r['mask_entries']:,} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
