"""Assembling components: padded and parallel assemblies equal their components side by side."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.assembly.assemble import Assembly, InputAdapter, OutputHead, assemble, can_pad, side_by_side
from modellego.assembly.scaling import scale_assembly
from modellego.errors import UserError
from modellego.evaluation.metrics import count_flops
from modellego.io.info import InputSpec, get_info

from helpers import described_model

NUM_CLASSES = 6
ZOO = [("lenet5", 0.25), ("vgg11_bn", 0.0625), ("resnet18", 0.0625), ("googlenet", 0.0625), ("mobilenet_v2", 0.125),
       ("mobilenet_v3_small", 0.125)]
# (label, [(source, classes), ...]); sources: "a" and "b" share their normalisation, "c" is "b"'s
# weights with another normalisation.
CONFIGS = [
    ("one-source-2", [("a", [0, 2]), ("a", [5, 1])]),
    ("one-source-3", [("a", [0, 2]), ("a", [5, 1]), ("a", [3])]),
    ("two-sources-2-same-norm", [("a", [0, 2]), ("b", [5, 1, 3])]),
    ("two-sources-2-other-norm", [("a", [0, 2]), ("c", [5, 1, 3])]),
    ("two-sources-3-same-norm", [("a", [0, 2]), ("b", [5, 1, 3]), ("a", [4])]),
    ("two-sources-3-other-norm", [("a", [0, 2]), ("c", [5, 1, 3]), ("a", [4])]),
]
NORMS = {"a": (0.1, 0.3), "b": (0.1, 0.3), "c": (0.45, 0.2)}
SEEDS = {"a": 1, "b": 2, "c": 2}
pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def make_source(name: str, width: float, seed: int, mean: float = 0.1, std: float = 0.3, *, dataset: str | None = None,
                size: tuple[int, int] = (28, 28), channels: int = 1) -> nn.Module:
    return described_model(name, width, seed, num_classes=NUM_CLASSES, channels=channels, size=size, mean=mean,
                           std=std, dataset=dataset or f"d{seed}")


def profile_of(model: nn.Module):
    info = get_info(model)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, info.input.channels, *info.input.size, generator=g)
    return modellego.profile(model, [(x, torch.arange(12) % NUM_CLASSES)], select=False)


def cut(model: nn.Module, classes: list[int], prof=None) -> nn.Module:
    return modellego.disassemble(model, classes, profile=prof or profile_of(model))


@functools.cache
def source(name: str, width: float, key: str) -> nn.Module:
    mean, std = NORMS[key]
    return make_source(name, width, SEEDS[key], mean, std, dataset=f"d{SEEDS[key]}")


@functools.cache
def source_profile(name: str, width: float, key: str):
    return profile_of(source(name, width, key))


@functools.cache
def component(name: str, width: float, key: str, classes: tuple[int, ...]) -> nn.Module:
    return cut(source(name, width, key), list(classes), source_profile(name, width, key))


@functools.cache
def component64(name: str, width: float, key: str, classes: tuple[int, ...]) -> nn.Module:
    """A float64 copy (tests must not modify it: assemble copies its inputs)."""
    return copy.deepcopy(component(name, width, key, classes)).double()


def components64(name: str, width: float, config: list) -> list[nn.Module]:
    return [component64(name, width, key, tuple(cls)) for key, cls in config]


def raw_images(n: int = 3, channels: int = 1, size: tuple[int, int] = (28, 28), seed: int = 11) -> torch.Tensor:
    return torch.rand(n, channels, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def assembly_input(asm: Assembly, x_raw: torch.Tensor) -> torch.Tensor:
    """Raw images for assemblies with adapters; normalised ones for stacked padded assemblies."""
    if asm.adapters is not None:
        return x_raw
    return InputAdapter(get_info(asm).input)(x_raw)


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _cases() -> list:
    """Every architecture padded with 2 and 3 components, one and two sources, equal and different
    normalisations; the cheap ones with every configuration. Parallel (simpler) on two configurations."""
    configs = dict(CONFIGS)
    cases = []
    for name, width in ZOO:
        cheap = name in ("lenet5", "vgg11_bn", "resnet18")
        padded = list(configs) if cheap else ["one-source-3", "two-sources-2-same-norm", "two-sources-3-other-norm"]
        parallel = ["one-source-2", "two-sources-3-other-norm"] if cheap else ["two-sources-3-other-norm"]
        cases += [pytest.param(name, width, configs[c], m, id=f"{name}-{c}-{m}")
                  for m, cs in (("padded", padded), ("parallel", parallel)) for c in cs]
    return cases


@pytest.mark.parametrize("name,width,config,mode", _cases())
def test_assembly_equals_components_side_by_side(name: str, width: float, config: list, mode: str) -> None:
    comps = components64(name, width, config)
    asm = assemble(comps, mode=mode)
    info = get_info(asm)
    assert isinstance(asm, Assembly) and asm.mode == mode and info.assembly.mode == mode
    assert not asm.training
    assert next(asm.parameters()).dtype == torch.float64
    same_norm = len({get_info(c).input for c in comps}) == 1
    # Stacked (one shared input) only for padded components of one normalisation.
    assert (asm.adapters is None) == (mode == "padded" and same_norm)
    x_raw = raw_images()
    want = side_by_side(comps, x_raw)
    got = run(asm, assembly_input(asm, x_raw))
    assert got.shape == (3, sum(len(c) for _, c in config)) == want.shape
    if mode == "parallel":
        assert torch.equal(got, want)  # the very same operations
    else:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    # The head is the identity until scaling.
    assert torch.equal(got, run(asm.logits, assembly_input(asm, x_raw)))
    # The components are copied, not shared.
    theirs = {q.data_ptr() for c in comps for q in c.parameters()}
    assert not any(p.data_ptr() in theirs for p in asm.parameters())


@pytest.mark.parametrize("mode", ["auto", "padded", "parallel"])
@pytest.mark.parametrize("name,width", [("lenet5", 0.25), ("resnet18", 0.0625)])
def test_component_assembled_alone_equals_the_component(name: str, width: float, mode: str) -> None:
    comp = component64(name, width, "c", (5, 1, 3))
    asm = assemble([comp], mode=mode)
    assert asm.mode == ("padded" if mode == "auto" else mode)
    x_raw = raw_images()
    x_norm = InputAdapter(get_info(comp).input)(x_raw)
    got = run(asm, assembly_input(asm, x_raw))
    torch.testing.assert_close(got, run(comp, x_norm), rtol=1e-12, atol=1e-12)
    info = get_info(asm)
    assert info.class_names == ("d2:5", "d2:1", "d2:3") and info.classes == (0, 1, 2)


def test_padded_assembly_of_different_widths_is_exact_and_round_trips(tmp_path) -> None:
    a = cut(make_source("lenet5", 0.25, 1, dataset="d1"), [0, 2])
    b = cut(make_source("lenet5", 0.5, 2, dataset="d2"), [3, 4, 5])
    asm = assemble([a, b])
    assert asm.mode == "padded"
    x_raw = raw_images().float()
    x = assembly_input(asm, x_raw)
    torch.testing.assert_close(run(asm, x), side_by_side([a, b], x_raw), rtol=1e-5, atol=1e-5)
    back = modellego.load(modellego.save(asm, tmp_path / "asm"))
    assert torch.equal(run(back, x), run(asm, x))


def test_label_map_names_and_groups() -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    b = component("lenet5", 0.25, "c", (5, 1, 3))
    a4 = component("lenet5", 0.25, "a", (4,))
    for mode in ("padded", "parallel"):
        asm = assemble([a, b, a4], mode=mode)
        info = get_info(asm)
        assert info.kind == "assembly" and info.arch is None
        assert info.class_names == ("d1:0", "d1:2", "d2:5", "d2:1", "d2:3", "d1:4")
        assert info.classes == tuple(range(6))
        assert info.dataset == "d1+d2"
        assert [e.to_json() for e in info.assembly.label_map] == [
            {"component": 0, "dataset": "d1", "source_class": 0, "name": "0"},
            {"component": 0, "dataset": "d1", "source_class": 2, "name": "2"},
            {"component": 1, "dataset": "d2", "source_class": 5, "name": "5"},
            {"component": 1, "dataset": "d2", "source_class": 1, "name": "1"},
            {"component": 1, "dataset": "d2", "source_class": 3, "name": "3"},
            {"component": 2, "dataset": "d1", "source_class": 4, "name": "4"},
        ]
        assert info.provenance["scaling"] == {"method": "none"}
        assert asm.head.groups.tolist() == [0, 0, 1, 1, 1, 2]
        assert len(info.assembly.components) == 3
    # Stacked padded assemblies take normalised input; the others raw [0, 1] images.
    stacked = assemble([a, a4], mode="padded")
    assert stacked.adapters is None and get_info(stacked).input == get_info(a).input
    raw = assemble([a, b], mode="padded")
    assert raw.adapters is not None and get_info(raw).input == InputSpec(1, (28, 28), (0.0,), (1.0,))


def test_auto_mode_picks_padded_for_one_architecture_and_parallel_otherwise() -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    b = component("lenet5", 0.25, "c", (5, 1, 3))
    assert can_pad([a, b]) is None
    assert assemble([a, b]).mode == "padded"

    vgg = component("vgg11_bn", 0.0625, "b", (5, 1, 3))
    assert "architectures differ" in can_pad([a, vgg])
    asm = assemble([a, vgg])
    assert asm.mode == "parallel"
    x_raw = raw_images().float()
    assert torch.equal(run(asm, x_raw), side_by_side([a, vgg], x_raw))
    with pytest.raises(UserError, match="cannot pad"):
        assemble([a, vgg], mode="padded")


@pytest.mark.parametrize("channels,size", [(1, (32, 32)), (3, (28, 28))])
def test_other_input_sizes_or_channels_are_assembled_in_parallel(channels: int, size: tuple[int, int]) -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    b = cut(make_source("lenet5", 0.25, 3, 0.5, 0.25, size=size, channels=channels), [1, 4])
    assert can_pad([a, b]) == "input channels or sizes differ"
    with pytest.raises(UserError, match="cannot pad"):
        assemble([a, b], mode="padded")
    asm = assemble([a, b])
    assert asm.mode == "parallel"
    spec = get_info(asm).input
    # Raw input: the most channels and the largest size, unnormalised.
    assert spec == InputSpec(channels, size, (0.0,) * channels, (1.0,) * channels)
    x_raw = torch.rand(2, spec.channels, *spec.size, generator=torch.Generator().manual_seed(4))
    got = run(asm, x_raw)
    assert got.shape == (2, 4)
    assert torch.equal(got, side_by_side([a, b], x_raw))


def test_an_assembly_is_not_padded_again() -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    b = component("lenet5", 0.25, "b", (5, 1))
    inner = assemble([a, b])
    assert can_pad([inner, a]) == "an input is already an assembly"
    with pytest.raises(UserError, match="cannot pad"):
        assemble([inner, component("lenet5", 0.25, "a", (4,))], mode="padded")


@pytest.mark.parametrize("mode", ["auto", "padded", "parallel"])
def test_duplicate_classes_raise_user_error(mode: str) -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    with pytest.raises(UserError, match="duplicate classes"):
        assemble([a, a], mode=mode)
    overlapping = component("lenet5", 0.25, "a", (2, 3))
    with pytest.raises(UserError, match=r"duplicate classes.*'d1:2'"):
        assemble([a, overlapping], mode=mode)
    # The same class index of another dataset is another class.
    other = component("lenet5", 0.25, "b", (0, 2))
    assert get_info(assemble([a, other], mode=mode)).class_names == ("d1:0", "d1:2", "d2:0", "d2:2")


def test_bad_arguments_raise_user_error() -> None:
    a = component("lenet5", 0.25, "a", (0, 2))
    with pytest.raises(UserError, match="nothing to assemble"):
        assemble([])
    with pytest.raises(UserError, match="mode must be"):
        assemble([a], mode="stacked")
    bare = modellego.create_model("lenet5", num_classes=3, in_channels=1, width=0.25)
    with pytest.raises(UserError, match="input description"):
        assemble([bare], mode="padded")
    with pytest.raises(UserError, match="input description"):
        assemble([bare], mode="parallel")
    nothing = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UserError, match="no description"):
        assemble([a, nothing])


def _round_trip(asm: Assembly, tmp_path, x: torch.Tensor) -> nn.Module:
    path = modellego.save(asm, tmp_path / f"asm-{asm.mode}")
    back = modellego.load(path)
    assert isinstance(back, Assembly) and back.mode == asm.mode
    assert get_info(back) == get_info(asm)
    sd, bd = asm.state_dict(), back.state_dict()
    assert sd.keys() == bd.keys() and all(torch.equal(sd[k], bd[k]) for k in sd)
    assert torch.equal(run(back, x), run(asm, x))
    return back


@pytest.mark.parametrize("norm", ["same-norm", "other-norm"])
@pytest.mark.parametrize("mode", ["padded", "parallel"])
def test_save_load_round_trip_is_bit_identical(tmp_path, mode: str, norm: str) -> None:
    a = component("resnet18", 0.0625, "a", (0, 2))
    b = component("resnet18", 0.0625, "b" if norm == "same-norm" else "c", (5, 1, 3))
    asm = assemble([a, b], mode=mode)
    x_raw = raw_images().float()
    x = assembly_input(asm, x_raw)
    _round_trip(asm, tmp_path / "plain", x)

    # After scaling the head (calibrated: scale, bias, energy and temperature all set).
    g = torch.Generator().manual_seed(3)
    fit = [(assembly_input(asm, torch.rand(20, 1, 28, 28, generator=g)), torch.arange(20) % 5)]
    report = scale_assembly(asm, fit, "calibrated")
    assert report["method"] == "calibrated"
    assert bool((asm.head.energy != 0).any()) and float(asm.head.temperature) != 1.0
    back = _round_trip(asm, tmp_path / "scaled", x)
    assert get_info(back).provenance["scaling"]["method"] == "calibrated"
    assert not torch.equal(run(back, x), run(back.logits, x))  # the head is not the identity any more


def test_padded_computes_zero_blocks_so_costs_more_flops_than_parallel() -> None:
    a = component("vgg11_bn", 0.0625, "a", (0, 2))
    b = component("vgg11_bn", 0.0625, "b", (5, 1, 3))
    padded, parallel = assemble([a, b], mode="padded"), assemble([a, b], mode="parallel")
    assert padded.adapters is None
    shape = (1, 28, 28)
    assert tuple(get_info(padded).input.size) == tuple(get_info(parallel).input.size) == (28, 28)
    f_pad, f_par = count_flops(padded, shape), count_flops(parallel, shape)
    f_parts = count_flops(a, shape) + count_flops(b, shape)
    # Parallel runs each component once (adapters' elementwise ops are not counted);
    # padded multiplies the zero off-diagonal blocks too.
    assert f_par == f_parts
    # Every inner layer's block-diagonal weight costs (a + b)·(a' + b') against a·a' + b·b' side by
    # side; measured here: 1.04 M against 0.58 M FLOPs (1.8x).
    assert f_par < f_pad < 2 * f_par


def test_output_head_formula() -> None:
    g = torch.Generator().manual_seed(2)
    z = torch.randn(5, 4, generator=g)
    head = OutputHead([0, 0, 1, 1])
    assert torch.equal(head(z), z)  # identity until fitted
    head.scale.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    head.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    head.energy.copy_(torch.tensor([0.7, -0.4]))
    head.temperature.fill_(2.0)
    lse0 = (z[:, :2] / 2).logsumexp(1, keepdim=True)
    lse1 = (z[:, 2:] / 2).logsumexp(1, keepdim=True)
    want = z * head.scale + head.bias + torch.cat([0.7 * lse0.expand(-1, 2), -0.4 * lse1.expand(-1, 2)], 1)
    torch.testing.assert_close(head(z), want)
