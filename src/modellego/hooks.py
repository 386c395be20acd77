"""The one place that registers hooks: they are always removed, and `model.training` restored."""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch.nn as nn

from .errors import UnknownNameError


@contextlib.contextmanager
def preserve_training(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's own training flag on exit (even if the block raises).

    ``model.train(flag)`` would set all submodules alike, losing e.g. a BatchNorm deliberately
    frozen in eval mode inside a model in training mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put `model` in eval mode for the block; every submodule's own flag comes back on exit."""
    with preserve_training(model):
        model.eval()
        yield model


@contextlib.contextmanager
def forward_hooks(
    model: nn.Module,
    hooks: Mapping[str, Callable],
    *,
    pre: bool = False,
    eval_mode: bool = True,
) -> Iterator[None]:
    """Register `hooks` (module name -> hook) on `model` for the duration of the block.

    Args:
        model: the model.
        hooks: forward hooks ``hook(module, inputs, output)`` or, with ``pre=True``, forward
            pre-hooks ``hook(module, inputs)`` keyed by names from ``model.named_modules()``.
        pre: register pre-hooks instead of forward hooks.
        eval_mode: put the model in eval mode inside the block.

    Hooks are removed and every module's training flag restored even if the block raises.
    Hooks should reduce or clone what they keep at once: an in-place op later in the forward
    pass may overwrite a tensor a hook only referenced.
    """
    modules = dict(model.named_modules())
    missing = [n for n in hooks if n not in modules]
    if missing:
        raise UnknownNameError(f"no such layers: {missing}; layer names come from model.named_modules()")
    handles = []
    with preserve_training(model):
        try:
            if eval_mode:
                model.eval()
            for name, fn in hooks.items():
                register = modules[name].register_forward_pre_hook if pre else modules[name].register_forward_hook
                handles.append(register(fn))
            yield
        finally:
            for h in handles:
                h.remove()
