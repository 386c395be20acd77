"""Which timm and torchvision CNNs modellego cuts exactly today (random weights, 10 classes, 64×64).

For each architecture: profile on 20 random images, disassemble classes 0-2 (the built-in check
compares the component with the masked source relative to the logits' scale), save the component
and load it into a fresh instance (same outputs?), and record either the kept share of parameters
or the refusal, whose message names the op and the layer. Beside it,
when torch-pruning is installed, whether Torch-Pruning's dependency graph prunes the same model
(L2 magnitude, half the channels of every prunable layer, the classifier left alone) into one
that still runs. Needs timm and torchvision; beside a CPU torch whose torchvision C extension does
not load, the test-only import in tests/vision_models.py is used.

    python benchmarks/real_models.py
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from rows import record

import modellego

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import vision_models  # noqa: E402  (the tests' helper: imports timm/torchvision without their C ops)

TIMM = ["resnet18", "resnet50", "resnext26ts", "regnetx_002", "efficientnet_b0", "mobilenetv2_100", "mobilenetv3_small_100",
        "mnasnet_100", "ghostnet_100", "densenet121", "convnext_atto", "convnext_tiny", "repvgg_a0", "cspresnet50", "dla34",
        "rexnet_100", "lcnet_050", "fbnetc_100", "tinynet_e", "vgg11_bn", "inception_v3",
        # A second round, beyond the list: multi-scale, split-attention, dual-path, standardised.
        "res2net50_14w_8s", "dpn68", "hrnet_w18_small", "nf_resnet26", "resnest14d", "skresnet18", "ecaresnet26t",
        "xception41", "vovnet39a", "mixnet_s", "seresnext26d_32x4d", "mobileone_s0"]
TP_SECONDS = 60  # Torch-Pruning's time per model before it counts as failed (it can loop on some graphs)
TORCHVISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1", "shufflenet_v2_x0_5",
               "googlenet", "vgg11_bn", "mnasnet0_5", "regnet_x_400mf", "densenet121", "alexnet"]


def torch_pruning_outcome(model: torch.nn.Module, x: torch.Tensor, seconds: int = TP_SECONDS) -> dict:
    """Prune half the channels with Torch-Pruning; the outcome, and the share of parameters left."""
    try:
        import torch_pruning as tp
    except ImportError:
        return {"tp_outcome": "not installed"}
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1:]
    before = sum(q.numel() for q in model.parameters())

    def give_up(signum, frame):  # type: ignore[no-untyped-def]
        raise TimeoutError(f"no result within {seconds} s")

    signal.signal(signal.SIGALRM, give_up)
    signal.alarm(seconds)
    try:
        pruner = tp.pruner.MagnitudePruner(model, x[:1], importance=tp.importance.MagnitudeImportance(p=2),
                                           pruning_ratio=0.5, ignored_layers=head)
        pruner.step()
        with torch.no_grad():
            model(x[:2])
    except Exception as e:  # every failure is recorded with its message
        return {"tp_outcome": f"failed ({type(e).__name__})", "tp_message": " ".join(str(e).split())[:200]}
    finally:
        signal.alarm(0)
    return {"tp_outcome": "pruned", "tp_params_kept": round(sum(q.numel() for q in model.parameters()) / before, 4)}


def file_roundtrip(component: torch.nn.Module, build, x: torch.Tensor) -> str:  # type: ignore[no-untyped-def]
    """Save the component, load it into a fresh instance of its architecture: "same outputs" or what differs."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            loaded = modellego.load(modellego.save(component, Path(tmp) / "component"), model=build().eval())
        except Exception as e:  # recorded, not raised: the table shows it (without this machine's paths)
            return f"failed ({type(e).__name__}: {' '.join(str(e).replace(tmp, 'FILE').split())[:120]})"
    with torch.no_grad():
        got, want = loaded(x), component(x)
    return "same outputs" if torch.equal(got, want) else f"differs by {float((got - want).abs().max()):.1e}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/real_models.jsonl"))
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--models", nargs="*", help="only these (library:name or name); default: every one")
    p.add_argument("--tp-seconds", type=int, default=TP_SECONDS, help="Torch-Pruning's time per model")
    args = p.parse_args(argv)
    logging.getLogger("modellego").setLevel(logging.ERROR)
    timm, tv = vision_models.load("timm"), vision_models.load("torchvision")
    if timm is None or tv is None:
        print("timm and torchvision are needed: pip install 'torch==2.13.0' timm torchvision", file=sys.stderr)
        return 2
    builders = [("timm", n, lambda n=n: timm.create_model(n, num_classes=10, pretrained=False)) for n in TIMM]
    builders += [("torchvision", n, lambda n=n: getattr(tv.models, n)(num_classes=10, **({"aux_logits": False, "init_weights": True}
                                                                                      if n == "googlenet" else {})))
                 for n in TORCHVISION]
    if args.models:
        builders = [b for b in builders if b[1] in args.models or f"{b[0]}:{b[1]}" in args.models]
    print("| library | model | outcome | params kept | seconds | Torch-Pruning |\n|---|---|---|---|---|---|")
    for lib, name, build in builders:
        torch.manual_seed(0)
        t0 = time.perf_counter()
        size = 299 if name == "inception_v3" else args.size
        row = {"library": lib, "model": name, "size": size, "torch": torch.__version__}
        try:
            model = build().eval()
            x, y = torch.randn(20, 3, size, size), torch.arange(20) % 10
            prof = modellego.profile(model, [(x, y)], select=False)
            component = modellego.disassemble(model, [0, 1, 2], profile=prof)
            kept = sum(q.numel() for q in component.parameters()) / sum(q.numel() for q in model.parameters())
            row.update(outcome="exact", params_kept=round(kept, 4), file=file_roundtrip(component, build, x[:4]))
        except Exception as e:  # every refusal is recorded with its message
            row.update(outcome=f"refused ({type(e).__name__})", message=" ".join(str(e).split())[:300])
        row["seconds"] = round(time.perf_counter() - t0, 1)
        torch.manual_seed(0)
        try:
            tp_model = build().eval()
            row.update(torch_pruning_outcome(tp_model, torch.randn(2, 3, size, size), args.tp_seconds))
        except Exception as e:  # the architecture itself did not build
            row.update(tp_outcome=f"failed ({type(e).__name__})", tp_message=str(e)[:200])
        record(row, args.out, echo=False)
        kept_cell = f"{row['params_kept']:.1%}" if "params_kept" in row else row.get("message", "")[:110]
        print(f"| {lib} | {name} | {row['outcome']} | {kept_cell} | {row['seconds']} | {row['tp_outcome']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
