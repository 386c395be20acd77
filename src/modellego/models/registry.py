"""Model registry: look up CNN classifiers by name and build them with validated arguments.

Every family module decorates its factory functions with :func:`register_model`;
:func:`create_model` is the single entry point that checks the common arguments
(``num_classes``, ``in_channels``, ``width``) before calling the factory.

Names of the form ``timm:NAME`` and ``torchvision:NAME`` build that library's classification
architecture instead (never with pretrained weights; nothing is downloaded), with only
``num_classes`` and ``in_channels`` as arguments. The library is imported when such a name is
built, so neither is a dependency; files record the name and the two arguments, never code.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import math
import numbers
import re
from collections.abc import Callable
from types import ModuleType
from typing import Any, TypeVar

from torch import nn

from ..errors import UnknownNameError, UserError, unknown_name
from ..io.info import MAX_CHANNELS, MAX_CLASSES, ModelInfo, set_info

__all__ = [
    "LIBRARIES",
    "LibraryMissingError",
    "classifier_layer",
    "create_model",
    "init_weights",
    "library_of",
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
        name: Registered model name (see :func:`list_models`); case-insensitive. Or
            ``timm:NAME`` / ``torchvision:NAME``: that library's architecture (randomly
            initialised; it takes `num_classes` and `in_channels` only, `width` must stay 1).
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
        LibraryMissingError: ``timm:`` or ``torchvision:`` name, and that library does not import.

    Shape:
        The model maps ``(B, in_channels, H, W)`` with ``H, W >= 28`` to ``(B, num_classes)``.
    """
    if not isinstance(name, str):
        raise UserError(f"model name must be a string, got {name!r}")
    if library_of(name) is not None:
        if not (isinstance(width, numbers.Real) and not isinstance(width, bool) and width == 1.0):
            raise UserError(f"{name.strip()} has no width multiplier; drop width={width!r}")
        return _create_library_model(name, num_classes=num_classes, in_channels=in_channels, **kwargs)
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


# --- Architectures of timm and torchvision, by name ---------------------------------------------------

LIBRARIES = ("timm", "torchvision")
LIBRARY_KWARGS = ("num_classes", "in_channels")  # all that a file may pass to a library's constructor
_ARCH_NAME = re.compile(r"[a-z0-9][a-z0-9_.]{0,199}")  # timm's and torchvision's names (timm's with a .tag)


class LibraryMissingError(UserError):
    """A ``timm:`` or ``torchvision:`` architecture was asked for, and that library does not import."""


def library_of(name: object) -> str | None:
    """The library part of ``timm:NAME`` / ``torchvision:NAME`` (any ``prefix:`` counts); None for zoo names."""
    if not isinstance(name, str) or ":" not in name:
        return None
    return name.split(":", 1)[0].strip().lower()


def _split_library_name(name: str) -> tuple[str, str]:
    library = library_of(name)
    arch = name.split(":", 1)[1].strip().lower()  # both libraries name their models in lower case
    if library not in LIBRARIES:
        raise UnknownNameError(f"unknown model library {library!r} in {name.strip()!r}; "
                               f"use {' or '.join(f'{lib}:NAME' for lib in LIBRARIES)}")
    if not _ARCH_NAME.fullmatch(arch):
        shown = arch if len(arch) <= 40 else arch[:37] + "..."
        raise UserError(f"{library} model name {shown!r} is not a name: lower-case letters, digits, '_' and '.' only")
    return library, arch


def _import_library(library: str, name: str) -> ModuleType:
    hint = f"install it (pip install {library}), or load a file of it with modellego.load(path, model=...)"
    try:
        return importlib.import_module(library)
    except ImportError:
        raise LibraryMissingError(f"{name} needs {library}, which is not installed: {hint}") from None
    except Exception as e:  # noqa: BLE001 - a broken install fails in many ways (e.g. torchvision's C ops)
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise LibraryMissingError(f"{name} needs {library}, which is installed but does not import ({why}): "
                                  f"{hint}") from None


def _library_names(library: str, module: ModuleType) -> list[str]:
    if library == "timm":
        return list(module.list_models())
    return list(module.models.list_models(module=module.models))  # classification models only


def _unknown(library: str, arch: str, known: list[str]) -> UnknownNameError:
    # The libraries know hundreds of names: the close ones, not the list.
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(f'{library}:{c}') for c in close)}?" if close else ""
    lister = "timm.list_models()" if library == "timm" else "torchvision.models.list_models(module=torchvision.models)"
    return UnknownNameError(f"unknown {library} model {arch!r}.{hint} ({lister} lists the {len(known)} it knows)")


def _create_library_model(name: str, *, num_classes: Any, in_channels: Any, **kwargs: Any) -> nn.Module:
    library, arch = _split_library_name(name)
    if kwargs:
        raise UserError(f"{library}:{arch} takes only {' and '.join(LIBRARY_KWARGS)}; got {', '.join(sorted(kwargs))}")
    num_classes = _check_int(num_classes, "num_classes", 1)
    in_channels = _check_int(in_channels, "in_channels", 1)
    if num_classes > MAX_CLASSES or in_channels > MAX_CHANNELS:
        raise UserError(f"{library}:{arch}: num_classes {num_classes} or in_channels {in_channels} is beyond the "
                        f"bounds ({MAX_CLASSES}, {MAX_CHANNELS})")
    module = _import_library(library, f"{library}:{arch}")
    known = _library_names(library, module)
    base = arch.split(".", 1)[0]  # timm names may carry a pretrained tag: "resnet18.a1_in1k"
    if base not in known or (library == "torchvision" and arch != base):
        raise _unknown(library, arch, known)
    try:
        if library == "timm":
            model = module.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels)
        else:
            model = module.models.get_model(arch, weights=None, num_classes=num_classes)
            if in_channels != 3:
                _read_channels(model, in_channels, f"{library}:{arch}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's own refusal of these arguments, as one line
        why = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise UserError(f"{library} cannot build {arch} with num_classes={num_classes}, in_channels={in_channels} "
                        f"({why})") from None
    key = f"{library}:{arch}"
    info = ModelInfo(arch=key, arch_kwargs={"num_classes": num_classes, "in_channels": in_channels},
                     class_names=tuple(str(i) for i in range(num_classes)), classes=tuple(range(num_classes)))
    return set_info(model, info)


def _read_channels(model: nn.Module, channels: int, name: str) -> None:
    """Make a torchvision model read `channels` image channels: its first convolution, rebuilt wider or narrower."""
    if getattr(model, "transform_input", False):
        raise UserError(f"{name} re-normalises 3-channel input itself (transform_input); it reads 3 channels only")
    layer_name, conv = next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)),
                            ("", None))
    if not isinstance(conv, nn.Conv2d) or conv.in_channels != 3 or conv.groups != 1:
        raise UserError(f"{name}: its first layer is not a plain 3-channel convolution; it reads 3 channels only")
    new = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, stride=conv.stride,  # type: ignore[arg-type]
                    padding=conv.padding, dilation=conv.dilation,  # type: ignore[arg-type]
                    bias=conv.bias is not None, padding_mode=conv.padding_mode)
    model.set_submodule(layer_name, new)
