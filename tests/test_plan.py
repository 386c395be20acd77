"""Pruning plans as data: composing a component's plan with its source's, and back."""
from __future__ import annotations

import pytest

from modellego.errors import UserError
from modellego.io.plan import compose_plans, relative_plan

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")


def test_compose_plans_by_hand() -> None:
    outer = {"conv": {"out": [1, 3, 4, 6], "in": [0, 1, 2]}, "bn": {"out": [1, 3, 4, 6]}, "fc": {"out": [3, 1], "in": [2, 5]}}
    inner = {"conv": {"out": [0, 2], "in": [0, 1, 2]}, "bn": {"out": [0, 2]}, "fc": {"out": [1], "in": [1]}}
    assert compose_plans(outer, inner) == {
        "conv": {"out": [1, 4], "in": [0, 1, 2]}, "bn": {"out": [1, 4]}, "fc": {"out": [1], "in": [5]},
    }
    assert compose_plans(None, inner) == inner
    assert relative_plan(outer, compose_plans(outer, inner)) == inner
    assert relative_plan(None, inner) == inner
    with pytest.raises(UserError, match="'conv' keeps out indices \\[2\\]"):
        relative_plan(outer, {"conv": {"out": [1, 2], "in": [0, 1, 2]}})
