"""Pruning plans as data: per layer name, the indices it keeps.

A *plan* maps layer names to kept output/input indices, ``{"features.0": {"out": [...], "in": [...]}}``.
Model files store one (`ModelInfo.pruning`); `modellego.cut.prune.prune_layers` replays it.
Plans compose: a component cut from a component is described relative to the base architecture.
"""
from __future__ import annotations

from ..errors import UserError

Plan = dict[str, dict[str, list[int]]]


def compose_plans(outer: Plan | None, inner: Plan) -> Plan:
    """Indices of `inner` (relative to an already pruned model) mapped back through `outer`."""
    if not outer:
        return inner
    plan = {k: {d: list(v) for d, v in dims.items()} for k, dims in outer.items()}
    for name, dims in inner.items():
        base = outer.get(name, {})
        plan[name] = {d: ([base[d][i] for i in idx] if d in base else list(idx)) for d, idx in dims.items()}
    return plan


def relative_plan(outer: Plan | None, composed: Plan) -> Plan:
    """The inverse of `compose_plans`: the `inner` plan with ``compose_plans(outer, inner) == composed``.

    Both plans index the base architecture (as model files store them); the result indexes the
    model that `outer` cut, e.g. the plan that cut a component from a source that is itself a
    component.

    Raises:
        UserError: `composed` keeps an index that `outer` had already dropped (it was not cut
            from that model).
    """
    if not outer:
        return {k: {d: list(v) for d, v in dims.items()} for k, dims in composed.items()}
    plan: Plan = {}
    for name, dims in composed.items():
        plan[name] = {}
        for d, idx in dims.items():
            if d not in outer.get(name, {}):
                plan[name][d] = list(idx)
                continue
            pos = {v: i for i, v in enumerate(outer[name][d])}
            missing = [v for v in idx if v not in pos]
            if missing:
                raise UserError(f"layer {name!r} keeps {d} indices {missing[:5]} that the source had already dropped: "
                                "the component was not cut from this source")
            plan[name][d] = [pos[v] for v in idx]
    return plan
