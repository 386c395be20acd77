"""Sample selection against a literal reading of the rule: per class, the top `fraction` of the
correctly classified samples by predicted probability, clamped to [min, max] and to what exists."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import modellego
from modellego.core.samples import SelectionConfig, log_odds, select_samples
from modellego.errors import UserError
from modellego.io.info import get_info

from helpers import NUM_CLASSES, SHAPE, _perturbed_pair
from helpers import zoo_model as build

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


class Logits(nn.Module):
    """A 'model' whose inputs are its logits, so each sample's probability is chosen by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))  # where the model lives

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _data(n: int = 300, classes: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct logits, mostly but not always favouring the label."""
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, classes, (n,), generator=g)
    x = torch.randn(n, classes, generator=g, dtype=torch.float64)  # (N, C)
    x[torch.arange(n), y] += 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    y[:5] = classes + 2  # labels the model has no output for: never counted, never selected
    return x, y


def _literal(x: torch.Tensor, y: torch.Tensor, c: int, fraction: float, lo: int, hi: int) -> torch.Tensor:
    prob = x.softmax(1)  # float64: these logits leave no ties
    ok = ((prob.argmax(1) == y) & (y == c)).nonzero().flatten()
    n = min(max(math.ceil(fraction * len(ok)), lo), hi, len(ok))
    order = prob[ok, c].argsort(descending=True)
    return x[ok[order[:n]]]


@pytest.mark.parametrize("hold_budget", [None, 0])  # 0: the selected samples are read again
@pytest.mark.parametrize("fraction,lo,hi", [(0.1, 2, 50), (0.5, 1, 7), (1.0, 3, 500)])
def test_the_selection_is_the_literal_rule_whatever_the_batches(fraction: float, lo: int, hi: int,
                                                                 hold_budget: int | None) -> None:
    x, y = _data()
    model = Logits()
    for size in (300, 64, 7):  # one batch, or streamed in many
        batches = [(x[i: i + size], y[i: i + size]) for i in range(0, len(y), size)]
        sel = select_samples(model, batches, fraction=fraction, min_per_class=lo, max_per_class=hi,
                             hold_budget=hold_budget)
        for c in range(4):
            want = _literal(x, y, c, fraction, lo, hi)
            assert torch.equal(sel.inputs[sel.labels == c], want), (size, c)
            assert sel.seen[c] == int((y == c).sum()) and sel.selected[c] == len(want)
            assert sel.correct[c] == int(((x.argmax(1) == y) & (y == c)).sum())
        assert set(sel.labels.tolist()) <= {0, 1, 2, 3} and sel.example.shape == (1, 4)


def test_a_subset_of_classes_and_a_short_class() -> None:
    x, y = _data()
    model = Logits()
    correct3 = int(((x.argmax(1) == y) & (y == 3)).sum())
    sel = select_samples(model, [(x, y)], classes=[3, 1], min_per_class=correct3 + 1, max_per_class=400)
    assert set(sel.seen) == {1, 3} and set(sel.labels.tolist()) == {1, 3}
    assert sel.short == [3] and sel.selected[3] == correct3  # every correct one, and reported
    with pytest.raises(UserError, match="fraction must be in"):
        select_samples(model, [(x, y)], fraction=0)
    with pytest.raises(UserError, match="no samples were given"):
        select_samples(model, [])


def test_log_odds_are_those_of_the_softmax_probability() -> None:
    x, y = _data()
    y = y.clamp(0, 3)
    p = x.softmax(1).gather(1, y[:, None]).squeeze(1)
    torch.testing.assert_close(log_odds(x, y), torch.log(p / (1 - p)), rtol=1e-12, atol=1e-12)


def test_saturated_probabilities_are_ranked_by_their_logits_whatever_the_order() -> None:
    """A confident model's float32 probability is exactly 1.0 once its logit leads by about 17:
    the ranking must still follow the logits, not the order in which the samples come."""
    n = 200
    gap = torch.linspace(20.0, 60.0, n)  # every sample saturates in float32
    x = torch.zeros(n, 3)
    x[:, 0] = gap
    assert bool((x.softmax(1)[:, 0] == 1.0).all())
    y = torch.zeros(n, dtype=torch.long)
    want = x[-20:].flip(0)  # fraction 0.1: the 20 largest leads, best first
    for seed in range(3):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        xs, ys = x[order], y[order]
        batches = [(xs[i: i + 32], ys[i: i + 32]) for i in range(0, n, 32)]
        sel = select_samples(Logits(), batches, fraction=0.1, min_per_class=1, max_per_class=100)
        assert torch.equal(sel.inputs, want), seed


class Readings:
    """Batches that differ from one reading to the next (a shuffling loader, a stream that ends)."""

    def __init__(self, *readings: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.readings = list(readings)

    def __iter__(self):
        return iter(self.readings.pop(0))


def test_candidates_past_the_budget_are_read_again_only_from_batches_that_allow_it() -> None:
    x, y = _data()
    model = Logits()
    held = select_samples(model, [(x, y)], fraction=0.3)
    # A budget of one sample's bytes: the inputs are dropped after the first batch, then read again.
    again = select_samples(model, [(x[:100], y[:100]), (x[100:], y[100:])], fraction=0.3,
                           hold_budget=x[0].numel() * x.element_size())
    assert torch.equal(again.inputs, held.inputs) and torch.equal(again.labels, held.labels)
    with pytest.raises(UserError, match="can be read only once"):
        select_samples(model, iter([(x, y)]), hold_budget=0)
    batches = [(x[i: i + 32], y[i: i + 32]) for i in range(0, len(y), 32)]
    shuffled = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    with pytest.raises(UserError, match="other samples on the second reading"):
        select_samples(model, Readings(batches, [(x[shuffled], y[shuffled])]), hold_budget=0)
    with pytest.raises(UserError, match="the batches ended after 32 samples on the second reading"):
        select_samples(model, Readings(batches, batches[:1]), hold_budget=0)
    with pytest.raises(UserError, match="hold_budget must be"):
        select_samples(model, [(x, y)], hold_budget=-1)
    assert torch.equal(select_samples(model, iter([(x, y)]), fraction=0.3).inputs, held.inputs)  # within budget


def test_class_without_correct_samples_is_reported_and_refused(caplog: pytest.LogCaptureFixture) -> None:
    model = build("lenet5", 0.25)
    with torch.no_grad():
        model.classifier.fc3.bias[2] = -1e4  # class 2 is never predicted
    x = torch.randn(60, *SHAPE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = model(x).argmax(1)  # labels the model agrees with...
    y[:6] = 2  # ...except six samples of class 2, all misclassified
    counts = torch.bincount(y[6:], minlength=NUM_CLASSES)
    ok = int(counts.argmax())
    assert counts[2] == 0 and counts[ok] >= 5

    with caplog.at_level("WARNING", logger="modellego"):
        prof = modellego.profile(model, [(x[:30], y[:30]), (x[30:], y[30:])], select=True)
    assert "2 (0 correct of 6)" in caplog.text  # said once, by name
    assert caplog.text.count("fewer than") == 1
    assert prof.provenance["missing"] == [c for c in range(NUM_CLASSES) if c == 2 or counts[c] == 0]
    assert 2 in prof.provenance["short"] and ok not in prof.provenance["short"]
    assert prof.provenance["selection"]["seen"]["2"] == 6 and prof.provenance["selection"]["correct"]["2"] == 0
    with pytest.raises(UserError, match="'2'"):
        modellego.disassemble(model, [ok, 2], profile=prof)
    component = modellego.disassemble(model, [ok], profile=prof)
    assert get_info(component).classes == (ok,)


class _Counted(list):
    """A list of batches that counts its readings."""

    readings = 0

    def __iter__(self):
        self.readings += 1
        return super().__iter__()


def test_selection_reads_the_batches_again_once_its_candidates_pass_half_the_free_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import modellego

    source, _, _, images = _perturbed_pair()
    with torch.no_grad():
        labels = [source(x).argmax(1) for x in images]  # every sample correct: every one a candidate
    held = _Counted(zip(images, labels))
    whole = modellego.profile(source, held, select=SelectionConfig(0.5, 1))
    monkeypatch.setattr("modellego.memory.free_bytes", lambda device: 0)
    again = _Counted(zip(images, labels))
    reread = modellego.profile(source, again, select=SelectionConfig(0.5, 1))
    assert (held.readings, again.readings) == (1, 2)
    assert reread.provenance["selection"] == whole.provenance["selection"]
    for k in whole.layers:
        assert torch.equal(reread.in_masks[k], whole.in_masks[k]) and torch.equal(reread.out_masks[k], whole.out_masks[k])
    explicit = _Counted(zip(images, labels))  # a budget given overrides the free memory
    modellego.profile(source, explicit, select=SelectionConfig(0.5, 1, hold_budget=10**12))
    assert explicit.readings == 1
