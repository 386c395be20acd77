"""Sample selection against a literal reading of the rule: per class, the top `fraction` of the
correctly classified samples by predicted probability, clamped to [min, max] and to what exists."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from modellego.core.samples import log_odds, select_samples
from modellego.errors import UserError


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
