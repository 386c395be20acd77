"""The `modellego` command end to end on the synthetic dataset: train, evaluate, profile,
disassemble, assemble, merge, evaluate again; and one-line errors for bad input."""
from __future__ import annotations

import contextlib
import io
import json
import os

import pytest
import torch

import modellego
from modellego.cli import EXAMPLES, main
from modellego.core.profile import Profile
from modellego.io.checkpoint import read_header
from modellego.io.info import InputSpec, get_info, set_info, weights_hash
from modellego.models import list_models

from helpers import torchrun

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")
TRAIN = ["--model", "vgg11_bn", "--width", "0.125", "--data", "synthetic", "--epochs", "1", "--train-limit", "800",
         "--batch-size", "16", "--lr", "0.05"]


def quiet(argv: list[str]) -> tuple[int, str]:
    """Run the command with stdout and stderr captured (for module fixtures, where capsys is not available)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    assert rc == 0, err.getvalue()[-2000:]
    return rc, out.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, str]:
    """One pipeline: a trained model, its profile, two components and two assemblies."""
    d = tmp_path_factory.mktemp("cli")
    p = {k: str(d / k) for k in ("model", "c012", "c34", "asm_paper", "asm_cal", "asm_den", "merged")}
    p["profile"] = str(d / "model.profile.safetensors")
    p["out"] = {}
    _, p["out"]["train"] = quiet(["train", *TRAIN, "-o", p["model"]])
    _, p["out"]["profile"] = quiet(["profile", p["model"], "--data", "synthetic", "-o", p["profile"]])
    # Calibrated (default method) from the dataset's training images, and the paper's faithful cut.
    _, p["out"]["c012"] = quiet(["disassemble", p["model"], "--classes", "0-2", "--profile", p["profile"],
                                 "--data", "synthetic", "-o", p["c012"]])
    _, p["out"]["c34"] = quiet(["disassemble", p["model"], "--classes", "class3,CLASS4", "--profile", p["profile"],
                                "--calibrate", "none", "-o", p["c34"]])
    for scaling, key in (("paper", "asm_paper"), ("calibrated", "asm_cal"), ("density", "asm_den")):
        _, p["out"][key] = quiet(["assemble", p["c012"], p["c34"], "--scaling", scaling,
                                  "--images-per-class", "50", "-o", p[key]])
    _, p["out"]["merged"] = quiet(["merge", p["model"], p["c012"], p["c34"], "--data", "synthetic",
                                   "--calibration-images", "500", "-o", p["merged"]])
    return p


def evaluate_json(capsys, *argv: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1
    return json.loads(out)


def check_report(result: dict, classes: list[int]) -> None:
    assert result["classes"] == classes
    acc = result["accuracy"]
    assert {"overall", "mean_per_class", "worst_class", "per_class", "counts"} <= acc.keys()
    assert sorted(int(k) for k in acc["per_class"]) == classes
    assert all(v == 50 for v in acc["counts"].values())  # 50 test images per synthetic class
    assert 0 <= acc["worst_class"] <= acc["mean_per_class"] <= 100
    assert {"params", "flops", "latency_ms", "batch", "device"} <= result["cost"].keys()
    assert result["cost"]["params"] > 0 and result["cost"]["flops"] > 0 and result["cost"]["latency_ms"] > 0


def test_train_saves_a_described_model(run) -> None:
    assert run["out"]["train"].startswith("saved ")
    model = modellego.load(run["model"])
    info = get_info(model)
    assert info.arch == "vgg11_bn" and info.kind == "model" and info.dataset == "synthetic"
    assert info.class_names == tuple(f"class{i}" for i in range(10))
    assert info.input.channels == 3 and tuple(info.input.size) == (32, 32)
    assert info.provenance["training"]["train_limit"] == 800 and info.provenance["training"]["epochs"] == 1
    assert info.provenance["test_accuracy"] > 50  # a usable model: profiling needs correct samples


def test_evaluate_json(run, capsys) -> None:
    result = evaluate_json(capsys, run["model"], "--data", "synthetic")
    check_report(result, list(range(10)))
    assert result["kind"] == "model" and result["arch"] == "vgg11_bn" and result["dataset"] == "synthetic"
    assert "masked_accuracy" not in result
    assert result["accuracy"]["overall"] == pytest.approx(get_info(modellego.load(run["model"])).provenance["test_accuracy"],
                                                          abs=1e-3)
    # A task inside the model's classes adds the Masked-Base baseline (never below Base).
    task = evaluate_json(capsys, run["model"], "--data", "synthetic", "--classes", "class1,2")
    check_report(task, [1, 2])
    assert task["masked_accuracy"]["mean_per_class"] >= task["accuracy"]["mean_per_class"]


def test_evaluate_text(run, capsys) -> None:
    assert main(["evaluate", run["model"], "--data", "synthetic", "--classes", "7"]) == 0
    out = capsys.readouterr().out
    assert "accuracy:" in out and "masked to the task" in out and "class7" in out and "FLOPs" in out


def test_profile_file(run) -> None:
    assert run["out"]["profile"].startswith("saved ")
    prof = Profile.load(run["profile"])
    assert prof.classes == tuple(range(10)) and prof.class_names == tuple(f"class{i}" for i in range(10))
    assert prof.thresholds == modellego.Thresholds()
    assert prof.model_sha256 and prof.provenance["input_shape"] == [3, 32, 32]


def test_memory_budgets_bound_what_profiling_holds_not_the_profile(run, tmp_path) -> None:
    """The smallest budgets: one class of sums at a time, and the selection reads the data again."""
    out = tmp_path / "lean.safetensors"
    quiet(["profile", run["model"], "--data", "synthetic", "--memory-budget", "0", "--hold-budget", "0", "-o", str(out)])
    lean, one = Profile.load(out), Profile.load(run["profile"])
    assert all(torch.equal(lean.in_masks[k], one.in_masks[k]) for k in one.layers)
    assert lean.provenance["selection"]["selected"] == one.provenance["selection"]["selected"]


@pytest.mark.parametrize("text,want", [("0", 0), ("512", 512), ("4K", 4096), ("1.5m", 3 << 19), ("2G", 2 << 30),
                                       ("2GiB", 2 << 30), ("1T", 1 << 40)])
def test_byte_sizes_on_the_command_line(text: str, want: int) -> None:
    from modellego.cli import _bytes
    assert _bytes(text) == want


@pytest.mark.parametrize("text", ["", "G", "lots", "-1G", "nan", "inf"])
def test_bad_byte_sizes_are_refused_in_one_line(run, tmp_path, capsys, text: str) -> None:
    assert main(["profile", run["model"], "--data", "synthetic", "--memory-budget", text, "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--memory-budget" in err and len(err.splitlines()) == 1


def test_profile_under_torchrun_writes_the_profile_of_all_shards_once(run, tmp_path) -> None:
    """Half the training images each; the profile equals one process's up to float32 rounding and
    ties (exact in float64: test_distributed.py)."""
    out = tmp_path / "two.safetensors"
    torchrun("profile", run["model"], "--data", "synthetic", "-o", str(out))
    two, one = Profile.load(out), Profile.load(run["profile"])
    assert (two.provenance["processes"], one.provenance["processes"]) == (2, 1)
    assert two.provenance["selection"]["seen"] == one.provenance["selection"]["seen"]  # all shards counted
    same = torch.cat([(two.in_masks[k] == one.in_masks[k]).flatten() for k in one.layers]).float().mean()
    assert same > 0.99, float(same)


def test_world_size_without_torchrun_is_one_clear_error(run, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["profile", run["model"], "--data", "synthetic", "-o", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "WORLD_SIZE is 2, but the process group did not start" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_disassemble_under_torchrun_profiles_in_both_processes_and_writes_once(run, tmp_path) -> None:
    out = tmp_path / "c34"
    torchrun("disassemble", run["model"], "--classes", "class3,CLASS4", "--data", "synthetic", "--calibrate", "none",
             "-o", str(out))
    two, one = modellego.load(out), modellego.load(run["c34"])  # the same cut, from a one-process profile
    assert get_info(two).provenance["profile"]["processes"] == 2 and get_info(two).classes == (3, 4)
    n_two, n_one = (sum(p.numel() for p in m.parameters()) for m in (two, one))
    assert abs(n_two - n_one) <= 0.01 * n_one, (n_two, n_one)


def test_disassembled_components(run) -> None:
    model = modellego.load(run["model"])
    n = sum(p.numel() for p in model.parameters())
    for key, classes, method in (("c012", (0, 1, 2), "recon+balance"), ("c34", (3, 4), "none")):
        comp = modellego.load(run[key])
        info = get_info(comp)
        assert info.kind == "component" and info.classes == classes
        assert info.class_names == tuple(f"class{c}" for c in classes)
        assert info.provenance["calibration"]["method"] == method
        assert sum(p.numel() for p in comp.parameters()) < n
        assert f"classes {[f'class{c}' for c in classes]}" in run["out"][key]
    # The uncalibrated component is exactly what the library cuts with the same profile.
    want = modellego.disassemble(model, [3, 4], profile=Profile.load(run["profile"]))
    got = modellego.load(run["c34"])
    ws, gs = want.state_dict(), got.state_dict()
    assert ws.keys() == gs.keys() and all(torch.equal(ws[k], gs[k]) for k in ws)


def test_evaluate_component(run, capsys) -> None:
    result = evaluate_json(capsys, run["c012"], "--data", "synthetic")
    check_report(result, [0, 1, 2])
    assert result["kind"] == "component" and "masked_accuracy" not in result
    assert result["accuracy"]["mean_per_class"] > 50
    assert result["cost"]["params"] < sum(p.numel() for p in modellego.load(run["model"]).parameters())


@pytest.mark.parametrize("key,scaling", [("asm_paper", "paper"), ("asm_cal", "calibrated"), ("asm_den", "density")])
def test_assemble_and_evaluate_without_data(run, capsys, key: str, scaling: str) -> None:
    assert "padded assembly of 2 components, 5 classes" in run["out"][key] and f"scaling {scaling}" in run["out"][key]
    asm = modellego.load(run[key])
    info = get_info(asm)
    assert info.kind == "assembly" and info.assembly.mode == "padded" and info.dataset == "synthetic"
    assert info.class_names == tuple(f"synthetic:class{c}" for c in range(5))
    assert info.provenance["scaling"]["method"] == scaling and info.provenance["scaling"]["images"] == 5 * 50
    assert not torch.equal(asm.head.scale, torch.ones(5))
    result = evaluate_json(capsys, run[key])  # no --data: the assembly knows its dataset
    check_report(result, [0, 1, 2, 3, 4])
    assert result["kind"] == "assembly" and result["dataset"] == "synthetic"
    assert result["accuracy"]["mean_per_class"] > 40


def test_merge_of_two_components(run, capsys) -> None:
    assert "classes ['class0', 'class1', 'class2', 'class3', 'class4']" in run["out"]["merged"]
    merged = modellego.load(run["merged"])
    info = get_info(merged)
    assert info.kind == "component" and info.classes == (0, 1, 2, 3, 4)
    assert info.provenance["calibration"]["method"] == "recon+balance" and len(info.provenance["merged_from"]) == 2
    # Before calibration it is exactly the library's merge.
    source, comps = modellego.load(run["model"]), [modellego.load(run[k]) for k in ("c012", "c34")]
    want = modellego.merge(source, comps)
    assert get_info(want).pruning == info.pruning
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert max(n(c) for c in comps) <= n(merged) < n(comps[0]) + n(comps[1])
    check_report(evaluate_json(capsys, run["merged"], "--data", "synthetic"), [0, 1, 2, 3, 4])


def test_padding_components_of_other_input_shapes_fails_with_one_line(run, tmp_path, capsys) -> None:
    torch.manual_seed(0)
    small = modellego.create_model("vgg11_bn", num_classes=4, in_channels=1, width=0.0625).eval()  # as the fixture's, but grey 28x28
    set_info(small, get_info(small).replace(input=InputSpec(1, (28, 28), (0.5,), (0.25,)), dataset="synthetic"))
    x = torch.randn(8, 1, 28, 28)
    comp = modellego.disassemble(small, [1], profile=modellego.profile(small, [(x, torch.arange(8) % 4)], select=False))
    other = str(modellego.save(comp, tmp_path / "small"))
    out = tmp_path / "asm"
    capsys.readouterr()
    assert main(["assemble", run["c012"], other, "--mode", "padded", "--scaling", "none", "-o", str(out)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot pad these components: input channels or sizes differ" in err[0]
    assert not out.exists()


def test_assemble_with_finetuning_then_density(run, tmp_path) -> None:
    out = str(tmp_path / "tuned")
    _, text = quiet(["assemble", run["c012"], run["c34"], "--finetune-epochs", "1", "--images-per-class", "30",
                     "-o", out])
    assert "scaling density" in text
    asm = modellego.load(out)
    prov = get_info(asm).provenance
    assert prov["finetune"]["epochs"] == 1 and prov["scaling"]["method"] == "density"
    assert asm.probe is not None
    # The body was trained: it differs from the untuned assembly of the same components.
    plain = modellego.assemble([modellego.load(run["c012"]), modellego.load(run["c34"])])
    tuned, untuned = asm.state_dict(), plain.state_dict()
    assert any(not torch.equal(tuned[k], untuned[k]) for k in untuned if k.startswith("body."))


def test_parallel_assembly_without_scaling(run, tmp_path, capsys) -> None:
    out = str(tmp_path / "par")
    assert main(["assemble", run["c012"], run["c34"], "--mode", "parallel", "--scaling", "none", "-o", out]) == 0
    assert "parallel assembly of 2 components" in capsys.readouterr().out
    asm = modellego.load(out)
    assert get_info(asm).provenance["scaling"] == {"method": "none"} and torch.equal(asm.head.scale, torch.ones(5))


def test_evaluate_assembly_with_data_uses_the_union_labels(run, tmp_path, capsys) -> None:
    # Outputs 0-1 are classes 3-4 and outputs 2-4 classes 0-2: --data's labels must be relabelled.
    out = str(tmp_path / "reversed")
    assert main(["assemble", run["c34"], run["c012"], "--scaling", "none", "-o", out]) == 0
    assert get_info(modellego.load(out)).class_names == tuple(f"synthetic:class{c}" for c in (3, 4, 0, 1, 2))
    without = evaluate_json(capsys, out)
    with_data = evaluate_json(capsys, out, "--data", "synthetic")
    assert with_data["accuracy"] == without["accuracy"]
    check_report(with_data, [0, 1, 2, 3, 4])
    task = evaluate_json(capsys, out, "--data", "synthetic", "--classes", "synthetic:class0,0")
    assert task["classes"] == [2, 0]
    assert task["masked_accuracy"]["mean_per_class"] >= task["accuracy"]["mean_per_class"]


def test_models_lists_the_zoo(capsys) -> None:
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert "lenet5" in names and "vgg11_bn" in names and names == sorted(names)


@pytest.mark.parametrize("command", [None, *EXAMPLES])
def test_help_exits_zero_and_shows_the_example(command: str | None, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--help"] if command is None else [command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    if command is None:
        assert out.startswith("usage: modellego")
        assert all(c in out for c in EXAMPLES)
    else:
        assert out.startswith(f"usage: modellego {command}")
        assert f"example: {EXAMPLES[command]}" in out.splitlines()  # one line, as typed
        assert EXAMPLES[command].startswith(f"modellego {command}")


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"modellego {modellego.__version__}"


def _error_cases(run: dict, junk: str, out: str) -> dict[str, tuple[list[str], str]]:
    m, p, c012 = run["model"], run["profile"], run["c012"]
    cut = ["--profile", p, "--calibrate", "none", "-o", out]
    return {
        "class out of range": (["disassemble", m, "--classes", "8-12", *cut], "out of range"),
        "duplicate classes": (["disassemble", m, "--classes", "1,0-2", *cut], "duplicate classes"),
        "empty class list": (["disassemble", m, "--classes", "", *cut], "empty item"),
        "unknown class name": (["disassemble", m, "--classes", "clas3", *cut], "Did you mean 'class3'"),
        "non-ASCII digit": (["disassemble", m, "--classes", "0-²", *cut], "unknown class"),
        "threshold above 1": (["profile", m, "--data", "synthetic", "--conv-alpha", "1.5", "-o", out], "(0, 1]"),
        "threshold 0": (["disassemble", m, "--classes", "0", "--data", "synthetic", "--calibrate", "none",
                         "--linear-beta", "0", "-o", out], "(0, 1]"),
        "profile of another model": (["disassemble", c012, "--classes", "0", *cut], "another model"),
        "random bytes (evaluate)": (["evaluate", junk, "--data", "synthetic"], "not a readable safetensors"),
        "random bytes (assemble)": (["assemble", c012, junk, "--scaling", "none", "-o", out], "not a readable"),
        "random bytes (disassemble)": (["disassemble", junk, "--classes", "0", *cut], "not a readable"),
        "missing model file": (["evaluate", out, "--data", "synthetic"], "no model file"),
        "unknown model": (["train", *TRAIN[:1], "lenet", *TRAIN[2:], "-o", out], "Did you mean 'lenet5'"),
        "unknown dataset": (["evaluate", m, "--data", "synthetc"], "Did you mean 'synthetic'"),
        "same component twice": (["assemble", c012, c012, "--scaling", "none", "-o", out], "duplicate classes"),
        "evaluate a model without data": (["evaluate", m], "--data"),
        "calibration without data": (["disassemble", m, "--classes", "0", "--profile", p, "--calibrate", "bn",
                                      "-o", out], "--data"),
        "unknown calibration": (["disassemble", m, "--classes", "0", "--profile", p, "--data", "synthetic",
                                 "--calibrate", "bn+bogus", "-o", out], "unknown calibration"),
        "merge with another source": (["merge", c012, run["c34"], "-o", out], "not cut from this source"),
        "budget without contributions": (["disassemble", m, "--classes", "0", "--flops", "0.5", *cut],
                                         "--keep-contributions"),
        "budget above 1": (["disassemble", m, "--classes", "0", "--flops", "2", "--data", "synthetic",
                            "--calibrate", "none", "-o", out], "(0, 1]"),
        "triton kernel on a CPU": (["profile", m, "--data", "synthetic", "--kernel", "triton", "-o", out],
                                   "kernel 'triton'"),
        "one component": (["assemble", c012, "-o", out], "at least two components"),
        "an assembly among the components": (["assemble", run["asm_paper"], run["c34"], "-o", out], "is an assembly"),
    }


CASES = ["class out of range", "duplicate classes", "empty class list", "unknown class name", "non-ASCII digit",
         "threshold above 1",
         "threshold 0", "profile of another model", "random bytes (evaluate)", "random bytes (assemble)",
         "random bytes (disassemble)", "missing model file", "unknown model", "unknown dataset",
         "same component twice", "evaluate a model without data", "calibration without data", "unknown calibration",
         "merge with another source", "budget without contributions", "budget above 1", "triton kernel on a CPU",
         "one component", "an assembly among the components"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_prints_one_line_and_fails(run, tmp_path, capsys, monkeypatch, case: str) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU must refuse the Triton kernel
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(512))
    out = tmp_path / "out"
    argv, expected = _error_cases(run, str(junk), str(out))[case]
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2
    assert len(lines) == 1, err
    assert lines[0].startswith(f"modellego {argv[0]}: error: ")
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not out.exists()  # nothing written


ZOO_WIDTHS = {"googlenet": "0.0625", "mobilenet_v2": "0.125", "mobilenet_v3_small": "0.125", "resnet50": "0.0625",
              "resnet34": "0.0625"}


@pytest.mark.parametrize("arch", list_models())
def test_every_zoo_model_trains_saves_reloads_and_evaluates(arch: str, tmp_path, capsys) -> None:
    out = tmp_path / "m"
    quiet(["train", "--model", arch, "--width", ZOO_WIDTHS.get(arch, "0.125"), "--data", "synthetic", "--epochs", "1",
           "--train-limit", "32", "--batch-size", "16", "-o", str(out)])
    a = modellego.load(out)
    # Bit-identical to what training saved: the stored hash covers every tensor's bytes.
    assert weights_hash(a.state_dict()) == read_header(out)["weights_sha256"]
    result = evaluate_json(capsys, str(out), "--data", "synthetic")
    assert result["arch"] == arch and result["cost"]["params"] == sum(p.numel() for p in a.parameters())
    assert result["cost"]["flops"] > 0 and 0 <= result["accuracy"]["overall"] <= 100


def test_disassemble_under_a_flops_budget(run, tmp_path, capsys) -> None:
    from modellego.evaluation.metrics import count_flops
    prof = str(tmp_path / "r.profile.safetensors")
    assert main(["profile", run["model"], "--data", "synthetic", "--keep-contributions", "-o", prof]) == 0
    assert Profile.load(prof).contributions is not None
    out = str(tmp_path / "budget")
    capsys.readouterr()
    assert main(["disassemble", run["model"], "--classes", "0-2", "--profile", prof, "--flops", "0.5",
                 "--data", "synthetic", "--calibration-images", "300", "-o", out]) == 0
    assert "of the FLOPs" in capsys.readouterr().out
    comp, model = modellego.load(out), modellego.load(run["model"])
    shape = Profile.load(prof).provenance["input_shape"]
    assert count_flops(comp, shape) <= 0.5 * count_flops(model, shape)
    prov = get_info(comp).provenance
    assert prov["calibration"]["method"] == "recon+balance" and prov["flops_budget"]["budget"] == 0.5
    assert prov["flops_budget"]["rank"] == "task"
    per_class = str(tmp_path / "budget-class")
    assert main(["disassemble", run["model"], "--classes", "0-2", "--profile", prof, "--flops", "0.5",
                 "--budget-rank", "class", "--calibrate", "none", "-o", per_class]) == 0
    assert get_info(modellego.load(per_class)).provenance["flops_budget"]["rank"] == "class"


BAD_LINES = [
    (["train", "--model", "lenet5", "--data", "synthetic", "--epochs", "0", "-o", "{tmp}/m"], "--epochs"),
    (["train", "--model", "lenet5", "--data", "synthetic", "--lr", "nan", "-o", "{tmp}/m"], "--lr"),
    (["train", "--model", "lenet5", "--data", "synthetic", "--width", "-1", "-o", "{tmp}/m"], "--width"),
    (["train", "--model", "lenet5", "--data", "synthetic", "-o", "{tmp}/afile/m"], "is a file, not a folder"),
    (["train", "--model", "lenet5", "--data", "synthetic", "-o", ""], "empty"),
    (["train", "--model", "lenet5", "--data", "synthetic", "--device", "tpu", "-o", "{tmp}/m"], "unknown device"),
    (["train", "--model", "lenet5", "--data", "mnist", "--data-dir", "{tmp}/afile", "-o", "{tmp}/m"], "not found"),
    (["profile", "{tmp}/afile", "--data", "synthetic", "-o", "{tmp}"], "is a folder"),
    (["profile", "{tmp}/afile", "--data", "synthetic", "-o", "{tmp}/afile"], "also an input"),
    (["disassemble", "{tmp}/afile", "--classes", "0", "--calibration-images", "-1", "-o", "{tmp}/c"], "--calibration-images"),
    (["disassemble", "{tmp}/afile", "--classes", "0", "--flops", "1.5", "-o", "{tmp}/c"], "--flops"),
    (["train", "--model", "lenet5", "--no-such-flag"], "required: --data"),
    (["train", "--model", "lenet5", "--data", "synthetic", "--no-such-flag", "-o", "{tmp}/m"], "unrecognized arguments"),
]


@pytest.mark.parametrize("argv,message", BAD_LINES, ids=[" ".join(a[:2] + [m]) for a, m in BAD_LINES])
def test_bad_command_lines_give_one_line_and_status_2(tmp_path, capsys, argv: list[str], message: str) -> None:
    (tmp_path / "afile").write_text("not a model")
    try:
        rc = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:  # argparse's own errors exit
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "error:" in err, err
    assert not (tmp_path / "m").exists() and not (tmp_path / "c").exists()  # refused before any work


def test_a_full_disk_is_one_line_and_leaves_nothing(run, tmp_path, capsys, monkeypatch) -> None:
    """The write fails as on a full disk (ENOSPC): one line, status 2, no file and no temporary left."""
    import errno

    from safetensors import torch as st

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "c"))

    monkeypatch.setattr(st, "save_file", full)
    monkeypatch.setattr("modellego.io.checkpoint.save_file", full, raising=False)
    capsys.readouterr()
    rc = main(["disassemble", run["model"], "--classes", "0-2", "--profile", run["profile"], "--calibrate", "none",
               "-o", str(tmp_path / "c")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "No space left on device" in err, err
    assert not any(tmp_path.rglob("*.safetensors")) and not any(tmp_path.rglob("*.tmp"))


def test_assemble_under_torchrun_scales_from_both_processes_and_writes_once(run, tmp_path) -> None:
    out = tmp_path / "asm"
    torchrun("assemble", run["c012"], run["c34"], "--scaling", "density", "--images-per-class", "50", "-o", str(out))
    two, one = modellego.load(out), modellego.load(run["asm_den"])
    assert get_info(two).provenance["scaling"]["images"] == 5 * 50  # of both processes' shares
    for k, v in one.state_dict().items():  # the same head and density scores, up to the order of summation
        got = two.state_dict()[k]
        assert (got.double() - v.double()).abs().max() <= 1e-4 * max(v.double().abs().max(), 1e-6), k
