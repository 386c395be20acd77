"""TEST-ONLY: import timm and torchvision beside a CPU torch whose torchvision C extension does not load.

The torchvision wheel that installs next to the pinned CPU torch is a CUDA build; its C extension
fails to load, and `import torchvision` then dies registering fake kernels for ops such as
``torchvision::nms`` that do not exist. Every timm version imports torchvision. The model code of
both is pure Python and needs none of those ops, so while torchvision is imported the
registration of fake kernels for missing ``torchvision::`` ops is skipped. Nothing else changes; a
user with a matching torchvision needs none of this. Returns None where either is not installed.
"""
from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

import torch


def _import_with_missing_ops_skipped(name: str) -> ModuleType:
    original = torch.library.register_fake

    def register_fake(op, *args, **kwargs):  # type: ignore[no-untyped-def]
        if isinstance(op, str) and op.startswith("torchvision::"):
            namespace, _, opname = op.partition("::")
            try:
                _ = getattr(getattr(torch.ops, namespace), opname.split(".")[0]).default
            except (AttributeError, RuntimeError):
                return lambda fn: fn  # the C op is missing: register nothing
        return original(op, *args, **kwargs)

    torch.library.register_fake = register_fake  # type: ignore[assignment]
    try:
        return importlib.import_module(name)
    finally:
        torch.library.register_fake = original  # type: ignore[assignment]


def load(name: str) -> ModuleType | None:
    """timm or torchvision, or None when it (or torchvision under it) is not installed."""
    if importlib.util.find_spec(name) is None or importlib.util.find_spec("torchvision") is None:
        return None
    _import_with_missing_ops_skipped("torchvision")
    return importlib.import_module(name)
