"""Model registry: look up CNN classifiers by name and build them with validated arguments.

Every family module decorates its factory functions with :func:`register_model`;
:func:`create_model` is the single entry point that checks the common arguments
(``num_classes``, ``in_channels``, ``width``) before calling the factory.
"""
from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ..errors import UserError, unknown_name
from ..io.info import ModelInfo, set_info

__all__ = [
    "classifier_layer",
    "create_model",
    "init_weights",
    "list_models",
    "register_model",
    "scaled",
]

ModelFactory = Callable[..., nn.Module]
F = TypeVar("F", bound=ModelFactory)

_REGISTRY: dict[str, ModelFactory] = {}


def _normalise(name: str) -> str:
    # Accept "VGG16-BN" for "vgg16_bn": names are lower-case with underscores.
    return name.strip().lower().replace("-", "_")


def _qualified(obj: object) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def register_model(name: str) -> Callable[[F], F]:
    """Register a model factory under ``name``.

    The factory must accept the keyword arguments ``num_classes``, ``in_channels``
    and ``width`` and return an ``nn.Module`` mapping ``(B, in_channels, H, W)``
    to logits ``(B, num_classes)``.

    Args:
        name: Registry key; normalised to lower case with underscores.

    Returns:
        A decorator that registers the factory and returns it unchanged.

    Raises:
        ValueError: If ``name`` is already taken by a different factory.
    """
    key = _normalise(name)

    def decorator(factory: F) -> F:
        existing = _REGISTRY.get(key)
        # Re-registering the same function (e.g. on module reload) is harmless.
        if existing is not None and _qualified(existing) != _qualified(factory):
            raise ValueError(f"model name {key!r} is already registered by {existing!r}")
        _REGISTRY[key] = factory
        return factory

    return decorator


def list_models() -> list[str]:
    """Return the sorted names of all registered models."""
    return sorted(_REGISTRY)


def _check_int(value: Any, what: str, minimum: int) -> int:
    # bool is an int subclass, but `num_classes=True` is certainly a mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise UserError(f"{what} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise UserError(f"{what} must be >= {minimum}, got {value}")
    return int(value)


def _check_width(width: Any) -> float:
    if isinstance(width, bool) or not isinstance(width, numbers.Real):
        raise UserError(f"width must be a positive number, got {width!r}")
    width = float(width)
    if not math.isfinite(width) or width <= 0:
        raise UserError(f"width must be a finite number > 0, got {width}")
    return width


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Construction is deterministic given the global torch seed
    (call ``torch.manual_seed`` first).

    Args:
        name: Registered model name (see :func:`list_models`); case-insensitive.
        num_classes: Number of output logits, >= 1.
        in_channels: Number of input image channels, >= 1.
        width: Channel multiplier, > 0; every hidden channel count ``c`` becomes
            ``scaled(c, width)``.
        **kwargs: Extra keyword arguments the factory accepts.

    Returns:
        The model, in training mode.

    Raises:
        UnknownNameError: If ``name`` is not registered (message lists close matches).
        UserError: If an argument is invalid or not accepted by the factory.

    Shape:
        The model maps ``(B, in_channels, H, W)`` with ``H, W >= 28`` to ``(B, num_classes)``.
    """
    if not isinstance(name, str):
        raise UserError(f"model name must be a string, got {name!r}")
    key = _normalise(name)
    if key not in _REGISTRY:
        raise unknown_name("model", name, _REGISTRY)
    factory = _REGISTRY[key]

    num_classes = _check_int(num_classes, "num_classes", 1)
    in_channels = _check_int(in_channels, "in_channels", 1)
    width = _check_width(width)

    # Report unsupported extra arguments as a UserError rather than a TypeError
    # from deep inside the factory.
    params = inspect.signature(factory).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        accepted = {"num_classes", "in_channels", "width"}
        extra = sorted(k for k in kwargs if k not in params)
        if extra:
            allowed = sorted(k for k in params if k not in accepted)
            raise UserError(
                f"model {key!r} does not accept argument(s) {', '.join(extra)}"
                + (f"; extra arguments it accepts: {', '.join(allowed)}" if allowed else "")
            )

    model = factory(num_classes=num_classes, in_channels=in_channels, width=width, **kwargs)
    # Every zoo model knows how to rebuild itself: files store this, never the module.
    info = ModelInfo(
        arch=key,
        arch_kwargs={"num_classes": num_classes, "in_channels": in_channels, "width": width, **kwargs},
        class_names=tuple(str(i) for i in range(num_classes)),
        classes=tuple(range(num_classes)),
    )
    return set_info(model, info)


def scaled(channels: int, width: float) -> int:
    """Scale a channel count by ``width``, keeping at least one channel."""
    return max(1, round(channels * width))


def init_weights(model: nn.Module) -> None:
    """Initialise ``model`` in place: Kaiming-normal convs, unit/zero norms.

    Linear layers keep PyTorch's default initialisation, which suits both the
    hidden ReLU layers and the final classifier of these small heads.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def classifier_layer(model: nn.Module) -> tuple[str, nn.Linear]:
    """Return ``(qualified_name, layer)`` of the last ``nn.Linear`` in ``named_modules()`` order.

    For every registered model this is the final classifier producing the logits.

    Raises:
        UserError: If the model contains no ``nn.Linear``.
    """
    found: tuple[str, nn.Linear] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise UserError(f"{type(model).__name__} has no nn.Linear classifier layer")
    return found
