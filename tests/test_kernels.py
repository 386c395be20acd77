"""The fused Triton kernel against the literal Eq. 3: compiled on a GPU, or run by Triton's CPU
interpreter where there is none (tests/conftest.py sets TRITON_INTERPRET before Triton is imported).
"""
from __future__ import annotations

import copy

import pytest
import torch

import modellego
from helpers import described_model
from modellego import kernels
from modellego.contribution import LayerAccumulator, literal_contribution
from modellego.errors import UserError
from test_contribution import ACC_LAYERS, _feed, _inputs

triton = pytest.importorskip("triton")
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


KERNEL_LAYERS = ["conv", "conv_reflect", "grouped", "depthwise", "conv_tiny_map", "conv_one_pixel", "linear"]


@pytest.mark.parametrize("kind", KERNEL_LAYERS)
def test_triton_accumulator_matches_literal(kind: str) -> None:
    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 11)
    slots = torch.tensor([0, 2, 1, 0, 0, 2, 1, 1, 0, 2, 2])  # interleaved: the kernel sorts by class itself
    acc = LayerAccumulator(copy.deepcopy(m).to(DEVICE), 4, "sample", kernel="triton")  # slot 3 has no samples
    _feed(acc, x.to(DEVICE), slots.to(DEVICE), [4, 7])
    s = literal_contribution(m, x).clamp(min=0)  # (B, Q, Pg)
    for slot in range(4):
        torch.testing.assert_close(acc.s_hat(slot).cpu(), s[slots == slot].sum(0), rtol=0, atol=1e-10)


def test_triton_kernel_float32_tiles_with_ragged_edges() -> None:
    """More filters and inputs than one tile, neither a multiple of it; float32 sums."""
    torch.manual_seed(0)
    u, w = torch.randn(9, 6, 9), torch.randn(6, 9, kernels.MAX_BLOCK_Q + 5)
    slots = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 0])
    out = torch.ones(6, 2, kernels.MAX_BLOCK_Q + 5, device=DEVICE)  # the kernel adds to what is there
    kernels.relu_class_sums(u.to(DEVICE), w.to(DEVICE), slots.to(DEVICE), out)
    out = out.cpu()
    s = torch.einsum("bpj,pjq->bpq", u, w).clamp(min=0)
    want = 1 + torch.stack([s[slots == c].sum(0) for c in range(2)], 1)  # (P, C, Q)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


# Every zoo family: plain chains, residual adds, inception concatenations, depthwise convolutions.
ZOO = [("lenet5", 0.25, 28), ("vgg11_bn", 0.0625, 8), ("resnet18", 0.0625, 16), ("googlenet", 0.0625, 16),
       ("mobilenet_v2", 0.125, 8)]


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
