"""Knowledge amalgamation and distillation: the loss as written, teachers on their own inputs, a
student that learns the union without labels, files that evaluate like assemblies, one-line errors."""
from __future__ import annotations

import json
import math

import pytest
import torch

import modellego
from modellego.apps.amalgamate import amalgamate, distill, distillation_loss, task_teacher, teacher_logits
from modellego.assembly.assemble import assemble
from modellego.assembly.scaling import scale_assembly
from modellego.cli import main
from modellego.data.union import union_dataset
from modellego.errors import UserError
from modellego.evaluation import protocol
from modellego.evaluation.protocol import scaling_batches
from modellego.io.info import get_info
from modellego.training.fit import FitConfig

from helpers import described_model

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")
QUICK = FitConfig(epochs=2, batch_size=16, lr=0.01)


def test_distillation_loss_equals_a_hand_computation() -> None:
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, -2.0]]

    def softmax(row: list[float], temp: float) -> list[float]:
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    for temp in (1.0, 2.0, 4.0):
        kl = [sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(softmax(tb, temp), softmax(sb, temp)))
              for sb, tb in zip(s, t)]
        want = temp ** 2 * sum(kl) / len(kl)  # T² · mean over the batch of KL(p ‖ q)
        got = distillation_loss(torch.tensor(s, dtype=torch.float64), torch.tensor(t, dtype=torch.float64), temp)
        assert abs(float(got) - want) < 1e-12, (temp, float(got), want)
    same = torch.tensor(t)
    assert float(distillation_loss(same, same + 5.0)) == pytest.approx(0.0, abs=1e-6)  # softmax ignores a shift
    with pytest.raises(UserError, match=r"\(2, 3\) and \(2, 4\)"):
        distillation_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_each_teacher_reads_the_images_through_its_own_normalisation(profiled) -> None:
    ds = profiled[0]
    a = described_model("lenet5", 0.25, seed=1, num_classes=3, mean=0.1, std=0.3, dataset="synthetic")
    b = described_model("lenet5", 0.25, seed=2, num_classes=2, mean=0.6, std=0.2, dataset="other")
    got = teacher_logits([a, b], ds, "val")
    x = ds.val.images.float() / 255  # (N, 1, 28, 28)
    with torch.no_grad():
        want = torch.cat([a((x - 0.1) / 0.3), b((x - 0.6) / 0.2)], 1)  # (N, 5)
    assert got.shape == (len(ds.val), 5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_amalgamated_student_learns_the_union_without_labels(profiled, tmp_path) -> None:
    ds, model, _ = profiled
    teachers = [task_teacher(model, [0, 1, 2]), task_teacher(model, [3, 4, 5])]
    student = amalgamate(teachers, ds, student="lenet5", width=0.25, config=QUICK, progress=False)
    info = get_info(student)
    assert info.kind == "assembly" and info.class_names == tuple(f"synthetic:class{c}" for c in range(6))
    assert [(e.component, e.dataset, e.source_class) for e in info.assembly.label_map] == \
        [(i // 3, "synthetic", i) for i in range(6)]
    rec = info.provenance["amalgamation"]
    history = rec["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2] and rec["train_images"] == len(ds.train)
    assert rec["val_loss"] < 0.5 * history[0]["val_loss"]  # the untrained student's loss, halved at least
    union = union_dataset(student, {"synthetic": ds})
    assert protocol.test_accuracy(student, union).mean_per_class > 60  # chance: 16.7
    # A file like an assembly's: rebuilt from its description, same outputs, same description.
    loaded = modellego.load(modellego.save(student, tmp_path / "ka"))
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(loaded(x), student(x))
    assert get_info(loaded).to_json() == json.loads(json.dumps(info.to_json()))


def test_distill_an_assembly_keeps_its_classes_and_learns_its_head(profiled) -> None:
    ds, model, _ = profiled
    asm = assemble([task_teacher(model, [0, 1, 2]), task_teacher(model, [3, 4, 5])])
    union = union_dataset(asm, {"synthetic": ds})
    scale_assembly(asm, scaling_batches(asm, union, per_class=30), "calibrated")
    with torch.no_grad():  # the target is the assembly's output, its fitted head included
        x = protocol.model_transform(asm, union)(union.val.images.float() / 255)
        want, raw = asm(x), asm.logits(x)
    assert not torch.allclose(want, raw, atol=1e-3)
    torch.testing.assert_close(teacher_logits([asm], union, "val"), want)
    student = distill(asm, ds, config=FitConfig(epochs=1, batch_size=16), progress=False)
    info, a_info = get_info(student), get_info(asm)
    assert info.class_names == a_info.class_names
    assert [(e.dataset, e.source_class) for e in info.assembly.label_map] == \
        [(e.dataset, e.source_class) for e in a_info.assembly.label_map]
    # Default student: the first teacher's architecture and width, with the union's classes.
    assert info.assembly.arch == "lenet5" and info.assembly.arch_kwargs["width"] == 0.25
    assert info.assembly.arch_kwargs["num_classes"] == 6
    one = task_teacher(model, [2])
    with pytest.raises(UserError, match="one class"):
        distill(one, ds, progress=False)


def test_task_teacher_is_the_masked_model_and_rebuilds(profiled, tmp_path) -> None:
    model = profiled[1]
    teacher = task_teacher(model, [4, 1])
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():  # equal up to the summation order of a smaller matrix product
        torch.testing.assert_close(teacher(x), model(x)[:, [4, 1]], rtol=1e-6, atol=1e-6)
    assert get_info(teacher).classes == (4, 1) and get_info(teacher).class_names == ("class4", "class1")
    again = task_teacher(teacher, [1])  # a restriction of a restriction names the architecture's rows
    assert get_info(again).pruning == {"classifier.fc3": {"out": [1]}}
    with torch.no_grad():
        loaded = modellego.load(modellego.save(again, tmp_path / "t"))
        assert torch.equal(loaded(x), again(x))
        torch.testing.assert_close(loaded(x), model(x)[:, [1]], rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory) -> dict[str, str]:
    """Untrained teachers of the default synthetic dataset (3x32x32, ten classes), and one of 28x28 inputs."""
    d = tmp_path_factory.mktemp("ka")
    out = {}
    for key, size in (("m", (32, 32)), ("m28", (28, 28))):
        m = described_model("lenet5", 0.25, seed=0, num_classes=10, channels=3, size=size, dataset="synthetic")
        out[key] = str(modellego.save(m, d / key))
    out["dir"] = str(d)
    return out


def test_amalgamate_command_writes_a_model_that_evaluates_like_an_assembly(teacher_files, capsys) -> None:
    out = teacher_files["dir"] + "/ka"
    student = ["--student", "lenet5", "--width", "0.25", "--epochs", "1", "--images", "300", "--batch-size", "32"]
    assert main(["amalgamate", teacher_files["m"], teacher_files["m"], "--classes", "0-2", "3-5", *student, "-o", out]) == 0
    assert capsys.readouterr().out.startswith("saved ")
    info = get_info(modellego.load(out))
    assert info.class_names == tuple(f"synthetic:{c}" for c in range(6))
    assert [(e.dataset, e.source_class) for e in info.assembly.label_map] == [("synthetic", c) for c in range(6)]
    assert main(["evaluate", out, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kind"] == "assembly" and result["classes"] == list(range(6))
    assert result["accuracy"]["counts"] == {str(c): 50 for c in range(6)}  # the union's test images
    distilled = teacher_files["dir"] + "/distilled"
    assert main(["distill", out, *student, "-o", distilled]) == 0
    assert get_info(modellego.load(distilled)).class_names == info.class_names
    resized = teacher_files["dir"] + "/resized"  # a teacher of 28x28 inputs reads the 32x32 images resized
    assert main(["amalgamate", teacher_files["m"], teacher_files["m28"], "--classes", "0-2", "3-5", "--resize",
                 *student, "-o", resized]) == 0
    assert get_info(modellego.load(resized)).provenance["amalgamation"]["resize"] is True


@pytest.mark.parametrize("argv, message", [
    (["{m}", "{m}"], "teachers 0 and 1 both predict class '0' of synthetic"),
    (["{m}", "--classes", "0-2"], "at least two teachers"),
    (["{m}", "{m}", "--classes", "0-2"], "one task per teacher"),
    (["{m}", "{m28}", "--classes", "0-2", "3-5"], "teacher 1 reads 28x28 images, the union's are 32x32; pass resize=True"),
])
def test_bad_input_is_one_line(teacher_files, capsys, argv: list[str], message: str) -> None:
    argv = [a.format(**teacher_files) for a in argv]
    assert main(["amalgamate", *argv, "--epochs", "1", "-o", teacher_files["dir"] + "/bad"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("modellego amalgamate: error: ") and message in err, err


def test_bad_arguments_are_refused(profiled) -> None:
    ds, model, _ = profiled
    pair = [task_teacher(model, [0]), task_teacher(model, [1])]
    with pytest.raises(UserError, match="at least one epoch"):
        amalgamate(pair, ds, config=FitConfig(epochs=0), progress=False)
    with pytest.raises(UserError, match="temperature"):
        amalgamate(pair, ds, temperature=0.0, progress=False)
    with pytest.raises(UserError, match="both predict class 'class0' of synthetic"):
        amalgamate([pair[0], task_teacher(model, [0, 1])], ds, progress=False)
