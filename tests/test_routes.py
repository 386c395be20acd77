"""Decision routes (modellego.apps.routes): metrics against hand computations, per-sample routes against
a profile of that one sample, figures for every zoo architecture, detector metrics and attacks, the CLI."""
from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.apps.routes import RouteAnalysis, plots, sample_routes
from modellego.apps.routes.detect import Mahalanobis
from modellego.apps.routes.report import describe_sample, write_route_report
from modellego.cli import main
from modellego.core.graph import trace
from modellego.core.locate import Thresholds, locate_class, minmax, minmax_rows
from modellego.core.profile import Profile
from modellego.errors import UserError
from modellego.evaluation.attacks import fgsm, pgd
from modellego.evaluation.detection import auroc, energy, fpr_at_tpr, max_softmax, standardised_sum
from modellego.models import list_models

from helpers import GroupedNet, zoo_data, zoo_model

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def hand_profile() -> Profile:
    """Three classes, two layers: routes written out by hand."""
    out = {
        "a": torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 0]], dtype=torch.bool),
        "b": torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.bool),
    }
    ins = {k: torch.ones(3, 2, dtype=torch.bool) for k in out}
    return Profile((0, 1, 2), ("zero", "one", "two"), ins, out, Thresholds())


def test_route_metrics_equal_a_hand_computation() -> None:
    an = RouteAnalysis.from_profile(hand_profile())
    assert an.kept("a") == [[0, 1], [0, 2], [0, 1]]
    assert an.counts("a") == {"width": 4, "kept": [2, 2, 2], "exclusive": [0, 1, 0], "shared_by_all": 1, "used_by_any": 3}
    assert an.counts("b") == {"width": 3, "kept": [1, 1, 1], "exclusive": [1, 1, 1], "shared_by_all": 0, "used_by_any": 3}
    # Layer a: {0,1} vs {0,2}: 1/3; {0,1} vs {0,1}: 1. Layer b: disjoint singletons.
    j_a = torch.tensor([[1, 1 / 3, 1], [1 / 3, 1, 1 / 3], [1, 1 / 3, 1]], dtype=torch.float64)
    assert torch.allclose(an.jaccard("a"), j_a)
    assert torch.allclose(an.jaccard("b"), torch.eye(3, dtype=torch.float64))
    # Over both layers, class 0 vs 2: shared {a0, a1}, union {a0, a1, b0, b2} -> 2/4.
    assert an.jaccard()[0, 2].item() == pytest.approx(0.5)
    assert an.jaccard()[0, 1].item() == pytest.approx(1 / 5)  # {a0} of {a0, a1, a2, b0, b1}
    assert an.parting_layer(0, 1) == "a"  # 1/3 < 0.5 from the first layer on
    assert an.parting_layer(0, 2) == "b"  # equal at a, apart at b
    assert an.parting_layer(0, 2, below=0.0) is None  # never below 0
    curve = an.overlap_curve()
    assert curve["mean"] == pytest.approx([(1 / 3 + 1 + 1 / 3) / 3, 0.0]) and curve["max"] == pytest.approx([1.0, 0.0])
    report = json.loads(json.dumps(an.to_json()))
    assert report["parting_layer"] == {"0-1": "a", "0-2": "b", "1-2": "a"}
    assert report["layers"][0]["channels"] == [[0, 1], [0, 2], [0, 1]]


def test_route_analysis_refuses_what_it_cannot_answer() -> None:
    an = RouteAnalysis.from_profile(hand_profile(), classes=[0, 2])
    assert an.classes == (0, 2) and an.class_names == ("zero", "two")
    with pytest.raises(UserError, match="not among"):
        an.row(1)
    with pytest.raises(UserError, match="no layer"):
        an.counts("c")
    with pytest.raises(UserError, match="not profiled"):
        RouteAnalysis.from_profile(hand_profile(), classes=[7])


def test_batched_walk_equals_one_class_at_a_time() -> None:
    s = torch.tensor([[0, 3, 1, 3], [2, 2, 2, 2], [0, 0, 0, 0]])
    assert all(torch.equal(minmax_rows(s)[i], minmax(s[i])) for i in range(len(s)))
    model = zoo_model("googlenet", 0.0625).double()
    x, _ = zoo_data(4)
    routes = sample_routes(model, x.double(), classes=[0, 1, 2, 3])
    graph = trace(model, x[:1].double())
    for i, c in enumerate([0, 1, 2, 3]):
        prof = modellego.profile(model, [(x[i: i + 1].double(), torch.tensor([c]))], select=False, classes=[c],
                                 keep_contributions=True)
        ins, outs = locate_class(graph, {k: v[0] for k, v in prof.contributions.items()}, c, Thresholds())
        assert all(torch.equal(outs[k], routes.routes[k][i]) for k in outs)


@pytest.mark.parametrize("name,width", [("lenet5", 0.25), ("vgg11_bn", 0.0625), ("resnet18", 0.0625),
                                        ("mobilenet_v2", 0.125), ("googlenet", 0.0625), ("mobilenet_v3_small", 0.125),
                                        ("grouped", 0.0)])
def test_sample_route_equals_the_class_route_of_a_profile_of_that_sample(name: str, width: float) -> None:
    # float64: the two paths contract in different orders, and r >= α must not flip on rounding.
    model = GroupedNet().double().eval() if name == "grouped" else zoo_model(name, width).double()
    x, _ = zoo_data(6)
    x = x[:, :1].double() if name == "grouped" else x.double()
    routes = sample_routes(model, x, batch_size=4)  # two batches
    assert torch.equal(routes.predicted, model(x).argmax(1))
    assert torch.equal(routes.classes, routes.predicted)
    hidden = [k for k in routes.layers if k != routes.output_layer]
    kept = torch.cat([routes.routes[k].flatten() for k in hidden]).double().mean()
    assert 0.05 < kept < 0.95  # routes that choose, so that equality means something
    for i in range(len(x)):
        c = int(routes.classes[i])
        prof = modellego.profile(model, [(x[i: i + 1], torch.tensor([c]))], select=False, classes=[c])
        for k in routes.layers:
            assert torch.equal(prof.out_masks[k][0], routes.routes[k][i]), (name, i, k)


def test_sample_routes_from_given_classes_and_scores() -> None:
    model = zoo_model("lenet5", 0.25).double()
    x, y = zoo_data(10)
    x = x.double()
    prof = modellego.profile(model, [(x, y)], select=False)
    an = RouteAnalysis.from_profile(prof)
    routes = sample_routes(model, x, classes=y)
    assert torch.equal(routes.classes, y)
    agree = routes.agreement(an)
    assert agree.shape == (10, len(routes.layers))
    assert torch.all(agree[:, routes.layers.index(routes.output_layer)] == 1)  # both routes are the class itself
    score = routes.score(an)
    assert torch.all((0 <= score) & (score <= 1))
    # By hand for input 0: Jaccard over every hidden layer's channels together.
    hidden = [k for k in routes.layers if k != routes.output_layer]
    mine = torch.cat([routes.routes[k][0] for k in hidden])
    theirs = torch.cat([an.routes[k][an.row(int(y[0]))] for k in hidden])
    assert score[0].item() == pytest.approx((mine & theirs).sum().item() / (mine | theirs).sum().item())
    # A route compared with its own class's profile route from that one sample alone scores 1.
    one = modellego.profile(model, [(x[:1], y[:1])], select=False, classes=[int(y[0])])
    assert routes.pick(0).score(RouteAnalysis.from_profile(one)).item() == 1.0
    lines = describe_sample(routes, 0, an, int((y[0] + 1) % 5))
    assert lines[0].startswith("predicted") and len(lines) == len(routes.layers) + 2
    with pytest.raises(UserError, match="one class per input"):
        sample_routes(model, x, classes=[0, 1])
    with pytest.raises(UserError, match="NaN"):
        sample_routes(model, torch.full_like(x, float("nan")))
    with pytest.raises(UserError, match="out of range"):
        routes.pick(10)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("name", list_models())
def test_figures_for_every_zoo_architecture(name: str, tmp_path: Path) -> None:
    model = zoo_model(name, 0.0625 if name not in ("lenet5", "mobilenet_v2", "mobilenet_v3_small") else 0.125)
    x, y = zoo_data(10)
    an = RouteAnalysis.from_profile(modellego.profile(model, [(x, y)], select=False))
    written = write_route_report(an, tmp_path, classes=[0, 1], formats=("png", "svg"))
    assert [p.name for p in written] == ["routes.json", "routes.png", "routes.svg", "similarity.png", "similarity.svg",
                                         "overlap.png", "overlap.svg"]
    for p in written:
        assert p.stat().st_size > 1000
    w, h = png_size(tmp_path / "routes.png")
    assert w >= 600 and h >= 500
    assert "<svg" in (tmp_path / "routes.svg").read_text()[:500]
    assert json.loads((tmp_path / "routes.json").read_text())["classes"] == [0, 1, 2, 3, 4]
    routes = sample_routes(model, x[:2])
    fig = plots.sample_figure(routes, 1, an, true_class=int(y[1]), image=x[1])
    assert png_size(plots.save_figure(fig, tmp_path / "s.png"))[0] >= 800
    assert not list(tmp_path.glob(".*tmp"))  # atomic writes leave nothing behind


def test_wide_layers_are_binned_and_bad_requests_refused(tmp_path: Path) -> None:
    an = RouteAnalysis.from_profile(hand_profile())
    # Layer a: channel 0 shared by all, 1 by two classes, 2 by class 1 only, 3 unused; layer b: one per class.
    fig = plots.route_diagram(an, [0, 1, 2], max_nodes=2)
    offsets = [c.get_offsets() for c in fig.axes[0].collections if len(c.get_offsets())]
    assert [len(o) for o in offsets] == [4, 3]  # one node per kind: no class's own channel hidden in a bin
    wide = Profile((0, 1), ("x", "y"), {"w": torch.ones(2, 1, dtype=torch.bool)},
                   {"w": torch.cat([torch.ones(2, 100), torch.eye(2).repeat_interleave(5, 1), torch.zeros(2, 90)], 1).bool()},
                   Thresholds())
    fig = plots.route_diagram(RouteAnalysis.from_profile(wide), max_nodes=20)  # 200 channels, 10 per node
    (column,) = [c.get_offsets() for c in fig.axes[0].collections if len(c.get_offsets())]
    assert len(column) == 10 + 1 + 1 + 9  # shared, only x, only y, unused
    with pytest.raises(UserError, match="1 to 8"):
        plots.route_diagram(an, [])
    with pytest.raises(UserError, match="png, svg, pdf"):
        plots.save_figure(fig, tmp_path / "x.jpg")


def test_seriation_puts_similar_classes_together() -> None:
    # Two blocks, interleaved: 0, 2, 4 alike and 1, 3, 5 alike.
    s = torch.full((6, 6), 0.1, dtype=torch.float64)
    for a, b in itertools.product(range(6), repeat=2):
        if a % 2 == b % 2:
            s[a, b] = 0.9
    order = plots.seriation(s.numpy()).tolist()
    assert {frozenset(order[:3]), frozenset(order[3:])} == {frozenset({0, 2, 4}), frozenset({1, 3, 5})}


def test_detector_metrics_equal_a_hand_computation() -> None:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(40, generator=g) + 1
    flagged = torch.cat([torch.randn(25, generator=g), normal[:5]])  # with ties across the two
    pairs = [(a > b) + 0.5 * (a == b) for a in normal.tolist() for b in flagged.tolist()]
    assert auroc(normal, flagged) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert auroc(normal, normal - 100) == 1.0 and auroc(normal, normal) == 0.5
    # FPR at 95% TPR by brute force: the highest threshold that keeps at least 95% of the normal scores.
    best = max(t for t in normal.tolist() if (normal >= t).double().mean() >= 0.95)
    assert fpr_at_tpr(normal, flagged) == pytest.approx((flagged >= best).double().mean().item())
    assert fpr_at_tpr(normal, flagged, tpr=1.0) == pytest.approx((flagged >= normal.min()).double().mean().item())
    with pytest.raises(UserError, match="both kinds"):
        auroc(normal, flagged[:0])
    logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    assert torch.allclose(max_softmax(logits), torch.tensor([1 / (1 + torch.exp(torch.tensor(-2.0))), 0.5]))
    assert torch.allclose(energy(logits), torch.logsumexp(logits, 1))
    z = standardised_sum([torch.tensor([0.0, 2.0]), torch.tensor([0.0, 20.0])], [torch.tensor([1.0]), torch.tensor([10.0])])
    assert z.item() == pytest.approx(0.0)  # both at their reference mean


def test_mahalanobis_equals_a_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double()
    x = torch.randn(50, 3, dtype=torch.float64)
    y = torch.arange(50) % 2
    det = Mahalanobis(model, "2").fit([(x, y)])
    h = torch.relu(model[0](x)).detach()
    means = torch.stack([h[y == c].mean(0) for c in (0, 1)])
    centred = h - means[y]
    cov = centred.T @ centred / len(h)
    cov = cov + 0.1 * cov.diagonal().mean() * torch.eye(4, dtype=torch.float64)
    d2 = torch.stack([((h - m) @ torch.linalg.inv(cov) * (h - m)).sum(1) for m in means], 1)
    _, feats = det.features(x)
    assert torch.allclose(det.score(feats), -0.5 * d2.amin(1))


def test_attacks_stay_in_the_ball_and_raise_the_loss() -> None:
    model = zoo_model("lenet5", 0.25)
    x, _ = zoo_data(16)
    x = x.clamp(-1, 1)
    y = model(x).argmax(1)
    eps = 0.1
    loss = nn.functional.cross_entropy
    for adv in (fgsm(model, x, y, eps, -1.0, 1.0), pgd(model, x, y, eps, -1.0, 1.0, steps=5)):
        assert (adv - x).abs().max() <= eps + 1e-6 and adv.min() >= -1 and adv.max() <= 1
        with torch.no_grad():
            assert loss(model(adv), y) > loss(model(x), y)
    with torch.no_grad():
        assert loss(model(pgd(model, x, y, eps, -1.0, 1.0, steps=10)), y) >= loss(model(fgsm(model, x, y, eps, -1.0, 1.0)), y)
    assert not model.training


def test_routes_command(tmp_path: Path, capsys) -> None:
    model_path = str(tmp_path / "m")
    assert main(["train", "--model", "lenet5", "--width", "0.25", "--data", "synthetic", "--epochs", "2",
                 "--train-limit", "1000", "--batch-size", "16", "--lr", "0.05", "-o", model_path]) == 0
    prof = str(tmp_path / "p.safetensors")
    assert main(["profile", model_path, "--data", "synthetic", "-o", prof]) == 0
    capsys.readouterr()
    assert main(["routes", model_path, "--profile", prof, "--classes", "1,2", "--format", "png,svg", "-o", str(tmp_path / "r")]) == 0
    assert "routes.json" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"routes.json", "routes.png", "routes.svg", "similarity.png",
                                                          "similarity.svg", "overlap.png", "overlap.svg"}
    assert main(["routes", model_path, "--profile", prof, "--data", "synthetic", "--sample", "3", "-o", str(tmp_path / "s.svg")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("predicted") and "route score" in out and (tmp_path / "s.svg").stat().st_size > 1000
    for argv, message in [(["--sample", "3"], "needs --data"), (["--data", "synthetic", "--sample", "99999"], "out of range"),
                          (["--format", "jpg"], "--format"), ([], None)]:
        rc = main(["routes", model_path, *(["--profile", prof] if message else []), *argv, "-o", str(tmp_path / "x")])
        assert rc == 2
        assert (message or "--profile") in capsys.readouterr().err
