"""The fused Triton kernel against the literal Eq. 3: compiled on a GPU, or run by Triton's CPU
interpreter where there is none (tests/conftest.py sets TRITON_INTERPRET before Triton is imported).
"""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import modellego
from modellego.core import kernels
from modellego.core.contribution import literal_contribution, make_accumulator
from modellego.errors import UserError

from helpers import ACC_LAYERS, _feed, _inputs, described_model

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


KERNEL_LAYERS = ["conv", "conv_reflect", "grouped", "depthwise", "conv_tiny_map", "conv_one_pixel", "linear"]


@pytest.mark.parametrize("kind", KERNEL_LAYERS)
def test_triton_accumulator_matches_literal(kind: str) -> None:
    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 11)
    slots = torch.tensor([0, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2])  # interleaved: the kernel sorts by class itself
    acc = make_accumulator(copy.deepcopy(m).to(DEVICE), 4, "sample", kernel="triton")  # slot 3 has no samples
    _feed(acc, x.to(DEVICE), slots.to(DEVICE), [4, 7])
    s = literal_contribution(m, x).clamp(min=0)  # (B, Q, Pg)
    for slot in range(4):
        torch.testing.assert_close(acc.s_hat(slot).cpu(), s[slots == slot].sum(0), rtol=0, atol=1e-10)


@pytest.mark.parametrize("samples,offsets", [(9, 9), (70, 4), (40, 25)], ids=["few", "many_samples", "5x5"])
def test_triton_kernel_float32_blocks_with_ragged_edges(samples: int, offsets: int) -> None:
    """More filters and samples than one block, neither a multiple of it; float32 sums."""
    torch.manual_seed(0)
    u, w = torch.randn(samples, 6, offsets), torch.randn(6, offsets, kernels.MAX_BLOCK_Q + 5)
    slots = torch.randint(0, 2, (samples,))  # class 2 has no samples
    out = torch.ones(6, 3, kernels.MAX_BLOCK_Q + 5, device=DEVICE)  # the kernel adds to what is there
    kernels.relu_class_sums(u.to(DEVICE), w.to(DEVICE), slots.to(DEVICE), out)
    out = out.cpu()
    s = torch.einsum("bpj,pjq->bpq", u, w).clamp(min=0)
    want = 1 + torch.stack([s[slots == c].sum(0) for c in range(3)], 1)  # (P, C, Q)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


# Every zoo family: plain chains, residual adds, inception concatenations, depthwise convolutions.
ZOO = [("lenet5", 0.25, 28), ("vgg11_bn", 0.0625, 8), ("resnet18", 0.0625, 16), ("googlenet", 0.0625, 16),
       ("mobilenet_v2", 0.125, 8), ("mobilenet_v3_small", 0.125, 8)]


@pytest.mark.parametrize("name,width,size", ZOO, ids=[z[0] for z in ZOO])
def test_profile_with_triton_equals_torch(name: str, width: float, size: int) -> None:
    model = described_model(name, width, 0, num_classes=3, channels=1, size=(size, size), dataset="d").double()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(12, 1, size, size, generator=g, dtype=torch.float64), torch.arange(12) % 3)]
    ref = modellego.profile(model, data, select=False, keep_contributions=True)
    got = modellego.profile(copy.deepcopy(model).to(DEVICE), data, select=False, keep_contributions=True, kernel="triton")
    assert got.provenance["kernel"] == "triton" and ref.provenance["kernel"] == "torch"
    for layer in ref.layers:
        torch.testing.assert_close(got.contributions[layer], ref.contributions[layer], rtol=0, atol=1e-9)
        assert torch.equal(got.in_masks[layer], ref.in_masks[layer]), layer


def _never_read():
    raise AssertionError("the batches were read before the kernel was checked")
    yield  # pragma: no cover


def test_triton_on_cpu_is_refused_before_any_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = described_model("lenet5", 0.25, 0, num_classes=3, channels=1, size=(28, 28), dataset="d")
    with pytest.raises(UserError, match="CUDA device"):
        modellego.profile(model, _never_read(), kernel="triton")
    monkeypatch.setattr(kernels, "available", lambda: False)
    with pytest.raises(UserError, match="needs Triton"):
        modellego.profile(model, _never_read(), kernel="triton")
    with pytest.raises(UserError, match="unknown kernel"):
        modellego.profile(model, _never_read(), kernel="cuda")


def test_kernel_refuses_mismatched_shapes() -> None:
    u, w = torch.zeros(3, 4, 9, device=DEVICE), torch.zeros(4, 4, 5, device=DEVICE)  # w should be (4, 9, Qg)
    slots = torch.zeros(3, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"u \(3, 4, 9\), w \(4, 4, 5\)"):
        kernels.relu_class_sums(u, w, slots, torch.zeros(4, 2, 5, device=DEVICE))
    w, out = torch.zeros(4, 9, 5, device=DEVICE), torch.zeros(4, 2, 5, device=DEVICE)
    stale = kernels.class_order(torch.zeros(5, dtype=torch.long, device=DEVICE), 2)  # another batch's
    with pytest.raises(ValueError, match="order does not match"):
        kernels.relu_class_sums(u, w, slots, out, stale)


# What the dispatcher can ask for: sample blocks of 16-32, filter blocks of 16-64, and J = 9 (8 in the
# product, the ninth apart), 4 (padded to 8) or 25 (padded to 32).
AHEAD = [("float32", 32, 64, 9), ("float32", 16, 16, 4), ("float32", 32, 32, 25), ("float64", 32, 64, 9),
         ("float64", 16, 16, 4)]
COMPILE_AHEAD = """
import json, sys, torch
from modellego.core import kernels
for dtype, *blocks in json.loads(sys.argv[1]):
    try:
        k = kernels.compile_ahead(90, getattr(torch, dtype), *blocks)
    except OSError as e:  # the wheel's assembler cannot run on this platform (a refused kernel still fails)
        print(json.dumps({"skip": str(e)}))
        break
    print(json.dumps({"name": k.metadata.name, "arch": k.metadata.arch, "cubin": len(k.asm["cubin"]),
                      "local": ".local" in k.asm["ptx"]}))
"""


def test_kernel_compiles_for_hopper(tmp_path) -> None:
    """The real compile, to a cubin, with Triton's own assembler: no GPU needed.

    A separate process, because Triton fixes interpreter mode when it is first imported.
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(modellego.__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", COMPILE_AHEAD, json.dumps(AHEAD)], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [json.loads(line) for line in run.stdout.splitlines()]
    if rows and "skip" in rows[0]:
        pytest.skip(f"Triton cannot assemble here: {rows[0]['skip']}")
    assert len(rows) == len(AHEAD)
    for row in rows:
        assert row["name"] == "relu_class_sums_kernel" and row["arch"] == "sm90", row
        assert row["cubin"] > 1000 and not row["local"], row  # no stack arrays before register allocation
