"""Profiling, disassembly, calibration and assembly on a CUDA device give the CPU's results.

These run only where a GPU is present; everything else in the suite runs on the CPU.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.assembly.assemble import InputAdapter, assemble, side_by_side
from modellego.assembly.scaling import scale_assembly
from modellego.io.info import get_info

from helpers import described_model

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.filterwarnings("ignore:no class uses channel space")]
CUDA = torch.device("cuda")
NUM_CLASSES = 5
SHAPE = (1, 28, 28)
ZOO = [("lenet5", 0.25), ("vgg11_bn", 0.0625), ("resnet18", 0.0625), ("googlenet", 0.0625), ("mobilenet_v2", 0.125),
       ("mobilenet_v3_small", 0.125)]


def build(name: str, width: float, seed: int = 0) -> nn.Module:
    return described_model(name, width, seed, num_classes=NUM_CLASSES, channels=SHAPE[0], size=SHAPE[1:],
                           dataset=f"d{seed}").double()


def data(n: int = 30, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g, dtype=torch.float64), torch.arange(n) % NUM_CLASSES


def on(model: nn.Module, device: torch.device) -> nn.Module:
    return copy.deepcopy(model).to(device)


@pytest.mark.parametrize("name,width", ZOO, ids=[z[0] for z in ZOO])
def test_profile_and_component_on_cuda_equal_cpu(name: str, width: float) -> None:
    model = build(name, width)
    x, y = data()
    cpu, gpu = (modellego.profile(on(model, d), [(x[:16], y[:16]), (x[16:], y[16:])], select=False)
                for d in (torch.device("cpu"), CUDA))
    assert cpu.layers == gpu.layers and cpu.model_sha256 == gpu.model_sha256
    for layer in cpu.layers:
        assert torch.equal(cpu.in_masks[layer], gpu.in_masks[layer].cpu()), layer
        assert torch.equal(cpu.out_masks[layer], gpu.out_masks[layer].cpu()), layer

    classes = [3, 1]
    comp_cpu = modellego.disassemble(model, classes, profile=cpu)
    comp_gpu = modellego.disassemble(on(model, CUDA), classes, profile=gpu)
    assert all(p.device.type == "cuda" for p in comp_gpu.parameters())
    x_test = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(comp_gpu(x_test.to(CUDA)).cpu(), comp_cpu(x_test), rtol=0, atol=1e-9)


def test_sample_selection_and_calibration_on_cuda() -> None:
    model = build("resnet18", 0.0625)
    x, _ = data(60)
    with torch.no_grad():
        y = model(x).argmax(1)  # a random model is "correct" on its own predictions
    task = sorted(set(y.tolist()))
    comps = []
    for d in (torch.device("cpu"), CUDA):
        m = on(model, d)
        prof = modellego.profile(m, [(x, y)], classes=task, select=modellego.SelectionConfig(0.5, 1))
        assert prof.provenance["selection"]["selected"] == {str(c): -(-int((y == c).sum()) // 2) for c in task}
        comps.append(modellego.disassemble(m, task, profile=prof, calibration=[(x, y)]))
    x_test = torch.randn(6, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(comps[1](x_test.to(CUDA)).cpu(), comps[0](x_test), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_assembly_and_scaling_on_cuda(mode: str, tmp_path) -> None:
    model_a, model_b = build("resnet18", 0.0625, 1), build("resnet18", 0.0625, 2)
    x, y = data()
    comps = [modellego.disassemble(on(m, CUDA), cls, profile=modellego.profile(on(m, CUDA), [(x, y)], select=False))
             for m, cls in ((model_a, [0, 2]), (model_b, [4, 1, 3]))]
    asm = assemble(comps, mode=mode)
    assert all(t.device.type == "cuda" for t in asm.state_dict().values())
    x_raw = torch.rand(5, *SHAPE, dtype=torch.float64, device=CUDA)
    x_in = x_raw if asm.adapters is not None else InputAdapter(get_info(asm).input).to(CUDA)(x_raw)
    with torch.no_grad():
        torch.testing.assert_close(asm(x_in), side_by_side(comps, x_raw), rtol=0, atol=1e-9)
    # Calibrated and density scaling run on the device.
    labels = torch.arange(len(x_raw) * 4, device=CUDA) % 5
    scale_assembly(asm, [(x_in.repeat(4, 1, 1, 1), labels)], "calibrated")
    assert asm.head.scale.device.type == "cuda"
    scale_assembly(asm, [(x_in.repeat(4, 1, 1, 1), labels)], "density")
    assert asm.probe is not None and all(t.device.type == "cuda" for t in asm.probe.state_dict().values())
    path = modellego.save(asm, tmp_path / "asm.safetensors")
    back = modellego.load(path)
    with torch.no_grad():
        torch.testing.assert_close(back.double()(x_in.cpu()), asm(x_in).cpu(), rtol=0, atol=1e-9)


def test_merge_on_cuda_equals_cpu() -> None:
    model = build("googlenet", 0.0625)
    x, y = data()
    merged = []
    for d in (torch.device("cpu"), CUDA):
        m = on(model, d)
        prof = modellego.profile(m, [(x, y)], select=False)
        comps = [modellego.disassemble(m, t, profile=prof) for t in ([0, 2], [3])]
        merged.append(modellego.merge(m, comps))
    x_test = torch.randn(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(merged[1](x_test.to(CUDA)).cpu(), merged[0](x_test), rtol=0, atol=1e-9)


@pytest.mark.parametrize("name,width", [("resnet18", 0.0625), ("mobilenet_v2", 0.125)])
def test_budget_and_recon_on_cuda_equal_cpu(name: str, width: float) -> None:
    """One CPU profile with contributions; the budgeted, refitted component on each device."""
    model = build(name, width)
    x, y = data(60)
    prof = modellego.profile(model, [(x, y)], select=False, keep_contributions=True)
    comps = [modellego.disassemble(on(model, d), [0, 2, 4], profile=prof, flops=0.5, calibration=[(x, y)],
                                   calibrate="recon+balance") for d in (torch.device("cpu"), CUDA)]
    assert get_info(comps[0]).pruning == get_info(comps[1]).pruning  # same channels located
    assert all(p.device.type == "cuda" for p in comps[1].parameters())
    x_test = torch.randn(4, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(comps[1](x_test.to(CUDA)).cpu(), comps[0](x_test), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("kind", ["conv", "grouped", "depthwise", "conv_tiny_map", "conv_one_pixel", "pointwise", "linear"])
def test_accumulator_on_cuda_matches_literal(kind: str) -> None:
    """Every contraction path (window sums, folded pixels, one pixel, O(P)) on the device."""
    from modellego.core.contribution import literal_contribution, make_accumulator

    from helpers import ACC_LAYERS, _inputs

    m = ACC_LAYERS[kind]()
    x = _inputs(kind, 10)
    slots = torch.tensor([0, 0, 2, 1, 1, 1, 0, 2, 2, 1])
    acc = make_accumulator(on(m, CUDA), 3, "sample")
    acc.update(x.to(CUDA), slots.to(CUDA))
    s = literal_contribution(m, x).clamp(min=0)  # (B, Q, Pg)
    for slot in range(3):
        torch.testing.assert_close(acc.s_hat(slot).cpu(), s[slots == slot].sum(0), rtol=0, atol=1e-10)
