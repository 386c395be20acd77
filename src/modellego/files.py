"""Model files back to modules: `save`, `load`, and `build`, which rebuilds any file's module.

A file stores a description (`ModelInfo`) and tensors (`modellego.io.checkpoint`). `build` turns
the description into a module of the right shapes: a zoo architecture or a recorded ``timm:NAME`` /
``torchvision:NAME`` one (`modellego.models.create_model` checks the name and its two arguments),
pruned by the stored plan, or an assembly of such modules. Nothing is unpickled and no stored code runs.

`read_state_dict` and `load_weights` read a plain state dict (safetensors, or a ``.pt`` file through
``torch.load(weights_only=True)``) into a model built by name, with one-line errors.

`load` never allocates what a file does not hold: it first builds the module's `skeleton` on the
meta device (shapes, no memory), checks that the description fits it (layer names, index ranges,
the input against the first layer, the classifier against the classes, the density head against
the body) and that its tensors are exactly the file's, by name, shape and kind, all before a byte
of tensor data is read. Only then are the tensors read, checked against their hash, and loaded.
"""
from __future__ import annotations

import copy
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .assembly.assemble import Assembly, assembly_skeleton
from .cut.prune import prune_layers
from .errors import CorruptFileError, UserError
from .io.checkpoint import ModelFile, StoredTensor, dtype_kind, one_line, open_model, resolve_path, write_model
from .io.info import ModelInfo, get_info, require_info, set_info
from .models import classifier_layer, create_model
from .models.registry import LibraryMissingError, library_of

# What building a module from a description may raise for a description that does not fit the
# zoo (names, sizes, kinds of layer): the file's fault, reported as a CorruptFileError.
_BUILD_ERRORS = (UserError, KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError,
                 OverflowError, NotImplementedError)


def build(info: ModelInfo) -> nn.Module:
    """The module described by `info`, with the right shapes and arbitrary weights."""
    if info.assembly is not None:
        spec = info.assembly
        parts = [build(c) for c in spec.components] if spec.mode == "parallel" else []
        return assembly_skeleton(spec, parts)
    if info.arch is None:
        raise UserError("no architecture recorded")
    model = create_model(info.arch, **info.arch_kwargs)
    if info.pruning:
        prune_layers(model, info.pruning)
    return model


class _ShapesOnly(TorchFunctionMode):
    """Build modules with their sized tensors on the meta device, and skip their initialisation.

    Tensors made from Python data (``torch.tensor(list)``: index lists, buffers of a few numbers)
    stay real: they are as large as the description that holds the data, and code may read them.
    Initialisation is skipped because it means nothing on meta tensors, and because torch's meta
    kernels for random fills import half of torch (seconds) on first use.
    """

    _SIZED = {torch.empty, torch.empty_strided, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn,
              torch.randint, torch.randperm, torch.arange, torch.eye, torch.linspace, torch.logspace}
    _FILLS = {torch.Tensor.normal_, torch.Tensor.uniform_, torch.Tensor.zero_, torch.Tensor.fill_}

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None):
        kwargs = kwargs or {}
        if func in self._SIZED and kwargs.get("device") is None:
            kwargs["device"] = "meta"
        elif (func in self._FILLS or getattr(func, "__module__", None) == "torch.nn.init") and args \
                and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            return args[0]
        return func(*args, **kwargs)


def skeleton(info: ModelInfo) -> nn.Module:
    """`build(info)` without memory: every tensor whose size the description sets is a meta tensor.

    Its ``state_dict()`` names and shapes are those of the real module. A ``timm:`` or
    ``torchvision:`` architecture whose constructor computes its widths with tensors (torchvision's
    RegNets) cannot be built on the meta device; it is built for real, at the size its name and the
    two checked arguments give (the file's tensors cannot enlarge it).
    """
    try:
        with _ShapesOnly():
            return build(info)
    except UserError:
        if info.assembly is not None or library_of(info.arch) is None:
            raise
    return build(info)


def save(model: nn.Module, path: str | os.PathLike, *, info: ModelInfo | None = None) -> Path:
    """Save `model` (with its `ModelInfo`) to `path` atomically; return the file written.

    `path` may be a folder (``model.safetensors`` is written inside it) or a file name. A component
    of a module the zoo cannot rebuild (``info.arch`` None) is saved too, as its plan and weights:
    `load` rebuilds it from an instance of the source's class (``load(path, model=MyNet())``).
    """
    info = info or require_info(model, "saving")
    if info.assembly is not None and any(c.arch is None for c in info.assembly.components):
        raise UserError("an assembly of components of modules outside the zoo cannot be saved yet: "
                        "save its components, and assemble them again after loading")
    return write_model(path, info, model.state_dict())


def load(path: str | os.PathLike, *, model: nn.Module | None = None,
         map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save`, in eval mode, with its `ModelInfo` attached.

    Args:
        path: the file, or the folder `save` wrote it in.
        model: for a file of a module the zoo cannot rebuild, an instance of the source's class
            (its weights do not matter): the stored pruning plan is replayed on a copy of it, and
            every tensor then comes from the file. Not modified.
        map_location: the device of the loaded module.

    A file of a ``timm:NAME`` or ``torchvision:NAME`` architecture (`modellego.create_model`)
    rebuilds it from that library, which must be installed (else pass `model`).

    Raises:
        UserError: no file at `path`; a file of a module outside the zoo without `model`, or one
            whose plan or tensors do not fit the given `model`; `LibraryMissingError`: the file's
            timm or torchvision architecture, and that library does not import.
        CorruptFileError: the file is truncated, corrupt, tampered with, not a modellego model, or
            describes a module its tensors do not fit.
    """
    path = resolve_path(path)
    with open_model(path) as f:
        info = f.info
        if model is not None or (info.arch is None and info.assembly is None):
            return _load_into(f, info, model, path).to(map_location).eval()
        try:
            model = skeleton(info)
            _check_fits(info, model)
        except LibraryMissingError:  # the machine's fault, not the file's
            raise
        except _BUILD_ERRORS as e:
            raise f.corrupt(f"the stored description cannot be rebuilt ({e})") from e
        _check_table(f, model.state_dict())
        tensors = f.weights()
    model = _materialise(model, info)
    try:
        _load_tensors(model, tensors)
        _check_loaded(info, model)
    except (RuntimeError, UserError) as e:
        raise f.corrupt(f"the weights do not fit the description: {e}") from e
    set_info(model, info)
    return model.to(map_location).eval()


def _load_tensors(model: nn.Module, tensors: Mapping[str, torch.Tensor], strict: bool = True) -> None:
    """`model.load_state_dict` of plain tensors, with the module versions of this code.

    A state dict carries each module's ``version`` beside its tensors, which a safetensors file
    cannot hold; some modules refuse to load without it (torchvision's MNASNet). The tensors were
    written from these classes, so the installed classes' versions are the ones to give.
    """
    state = OrderedDict(tensors)
    state._metadata = getattr(model.state_dict(), "_metadata", None)  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=strict)


def _load_into(f: ModelFile, info: ModelInfo, model: nn.Module | None, path: Path) -> nn.Module:
    """The file's module rebuilt from the caller's `model`: its plan replayed on a copy, then every tensor loaded."""
    if model is None:
        raise UserError(f"{path} holds a {info.kind} of a module the zoo cannot rebuild; load it with "
                        "modellego.load(path, model=YourNet()), an instance of the source model's class")
    if info.assembly is not None:
        raise UserError(f"{path} holds an assembly; model= rebuilds models and components only")
    base = copy.deepcopy(model).cpu()
    try:
        prune_layers(base, info.pruning or {})
        _check_outputs(base, info.num_classes, "model")
    except (UserError, IndexError, ValueError, RuntimeError) as e:
        raise UserError(f"{path} does not fit the given {type(model).__name__}: {e}") from e
    try:
        _check_table(f, base.state_dict())
    except CorruptFileError as e:
        raise UserError(f"{path} does not fit the given {type(model).__name__}: {e}") from e
    try:
        _load_tensors(base, f.weights())
    except RuntimeError as e:
        raise f.corrupt(f"the weights do not fit the given module: {e}") from e
    set_info(base, info)
    return base


def _materialise(model: nn.Module, info: ModelInfo) -> nn.Module:
    """Real, uninitialised storage for a skeleton whose every tensor the file holds."""
    saved = set(model.state_dict())
    held = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    held |= {n for n, _ in model.named_buffers(remove_duplicate=False)}
    if held <= saved:
        model = model.to_empty(device="cpu")
        if not any(isinstance(v, torch.Tensor) and v.is_meta for m in model.modules() for v in vars(m).values()):
            return model
    # Tensors a file does not hold (non-persistent buffers; no zoo module has them today) need the
    # module's own initialisation: a real build, of the architecture the checked description names.
    return build(info)


def _check_table(f: ModelFile, want: Mapping[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the module's: names, shapes and kind of dtype."""
    missing = sorted(set(want) - set(f.table))
    unexpected = sorted(set(f.table) - set(want))
    if missing or unexpected:
        raise f.corrupt(f"the tensors do not fit the description: {len(missing)} missing {missing[:3]}, "
                        f"{len(unexpected)} unexpected {unexpected[:3]}")
    for name, t in want.items():
        stored: StoredTensor = f.table[name]
        if stored.shape != tuple(t.shape):
            raise f.corrupt(f"tensor {name!r} has shape {list(stored.shape)}, the description builds {list(t.shape)}")
        if stored.kind != dtype_kind(t.dtype):
            raise f.corrupt(f"tensor {name!r} is {stored.dtype}, the description builds {t.dtype}")


def _first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first Conv2d or Linear in registration order: for every zoo model, the one reading the input."""
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)), None)


def _check_first_layer(model: nn.Module, channels: int, size: tuple[int, int], where: str) -> None:
    found = _first_layer(model)
    if found is None:
        return
    name, layer = found
    width = layer.in_channels if isinstance(layer, nn.Conv2d) else layer.in_features
    if width != channels:
        raise UserError(f"{where}: {channels} input channels, but the first layer {name!r} reads {width}")
    if isinstance(layer, nn.Conv2d) and not isinstance(layer.padding, str):
        for side, k, p, s, d in zip(size, layer.kernel_size, layer.padding, layer.stride, layer.dilation):
            if (side + 2 * p - d * (k - 1) - 1) // s + 1 < 1:
                raise UserError(f"{where}: input size {list(size)} is smaller than the kernel {list(layer.kernel_size)} "
                                f"of the first layer {name!r}")


def _check_outputs(model: nn.Module, outputs: int, where: str) -> None:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if not any(isinstance(m, nn.Linear) for _, m in layers) and layers:  # a 1×1 convolution as classifier (SqueezeNet)
        name, conv = layers[-1]
        width = conv.out_channels if isinstance(conv, nn.Conv2d) else conv.out_features
    else:
        name, fc = classifier_layer(model)
        width = fc.out_features
    if width != outputs:
        raise UserError(f"{where}: {outputs} classes, but the classifier {name!r} has {width} outputs")


def _in_width(body: nn.Module, layer: str, where: str) -> int:
    m = dict(body.named_modules()).get(layer)
    if isinstance(m, nn.Conv2d):
        return m.in_channels
    if isinstance(m, nn.Linear):
        return m.in_features
    raise UserError(f"{where} names layer {layer!r}, which is not a Conv2d or Linear layer of the body")


def _check_fits(info: ModelInfo, model: nn.Module, where: str = "model") -> None:
    """What building does not check itself: the input, the classifier, an assembly's own parts."""
    spec = info.assembly
    if spec is None:
        if info.input is not None:
            _check_first_layer(model, info.input.channels, info.input.size, f"{where}.input")
        _check_outputs(model, info.num_classes, where)
        return
    assert isinstance(model, Assembly)  # built from an AssemblySpec
    comps = spec.components
    if spec.mode == "parallel":
        assert isinstance(model.body, nn.ModuleList)  # one module per component
        raw = info.input.channels if info.input else None
        for i, (c, m) in enumerate(zip(comps, model.body)):
            at = f"{where}.assembly.components[{i}]"
            _check_fits(c, m, at)
            own = c.input.channels if c.input else None
            if raw is not None and own is not None and raw != own and {raw, own} != {1, 3}:  # InputAdapter's rule
                raise UserError(f"{at}.input: {own} channels cannot be made from the assembly's {raw}-channel input")
    else:
        inputs = [c.input for c in comps if c.input is not None]
        if spec.adapters and len(inputs) == len(comps):
            sizes = {i.size for i in inputs}  # the adapters' outputs are concatenated along channels
            if len(sizes) > 1:
                raise UserError(f"{where}.assembly: padded components read one image size, got {sorted(sizes)}")
            _check_first_layer(model.body, sum(i.channels for i in inputs), inputs[0].size, f"{where}.assembly")
        elif not spec.adapters and info.input is not None:
            _check_first_layer(model.body, info.input.channels, info.input.size, f"{where}.input")
        _check_outputs(model.body, len(spec.label_map), f"{where}.assembly")
        for name, positions in spec.layer_inputs.items():
            width = _in_width(model.body, name, f"{where}.assembly.layer_inputs")
            if any(p >= width for pos in positions for p in pos):
                raise UserError(f"{where}.assembly.layer_inputs[{name!r}]: a position beyond the layer's {width} inputs")
    for k, site in enumerate(spec.density or ()):  # layers of the body (a parallel one's: "component.layer")
        width = _in_width(model.body, site.layer, f"{where}.assembly.density[{k}]")
        if site.features > width:
            raise UserError(f"{where}.assembly.density[{k}]: {site.features} features of a layer of {width} inputs")


def _check_loaded(info: ModelInfo, model: nn.Module) -> None:
    """Index buffers of an assembly agree with its description (other tensors are plain numbers)."""
    spec = info.assembly
    if spec is None:
        return
    assert isinstance(model, Assembly)
    if model.head.groups.tolist() != spec.groups:
        raise UserError("the output head's groups differ from the label map")
    if spec.mode == "parallel":
        for c, m in zip(spec.components, cast(nn.ModuleList, model.body)):
            _check_loaded(c, m)
    if model.probe is not None and spec.density:
        if model.probe.owner.tolist() != [s.component for s in spec.density]:
            raise UserError("the density head's owners differ from its sites")
        for k, site in enumerate(spec.density):
            width = _in_width(model.body, site.layer, f"density[{k}]")
            pos = getattr(model.probe, f"positions_{k}")
            if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= width):
                raise UserError(f"density site {k} reads positions outside the {width} inputs of {site.layer!r}")


# --- Plain state dicts (weights of a model built by name) ---------------------------------------------

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")  # training checkpoints that wrap a state dict


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file: ``.safetensors``, or ``.pt`` / ``.pth`` / ``.bin`` read with
    ``torch.load(weights_only=True)`` (tensors and plain containers only; no code runs).

    A training checkpoint holding its state dict under ``state_dict`` or ``model`` is unwrapped,
    and a ``module.`` prefix on every name (``nn.DataParallel``) is dropped.

    Raises:
        UserError: no such file, another suffix, or a file that is not a state dict (one line).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"no weights file at {p}")
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(p), device="cpu")
        elif suffix in _TORCH_SUFFIXES:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"{p}: weights must be a .safetensors file, or a .pt / .pth state dict; got {p.suffix!r}")
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors' and torch.load's many refusals, as one line
        raise UserError(f"{p} is not a readable state dict ({one_line(f'{type(e).__name__}: {e}', 200)})") from None
    if isinstance(obj, Mapping) and not _is_state_dict(obj):
        obj = next((obj[k] for k in _NESTED_KEYS if isinstance(obj.get(k), Mapping) and _is_state_dict(obj[k])), obj)
    if not isinstance(obj, Mapping) or not obj or not _is_state_dict(obj):
        raise UserError(f"{p} does not hold a state dict (a mapping of names to tensors)")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _is_state_dict(obj: Mapping) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def load_weights(model: nn.Module, weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a state dict (a file, see `read_state_dict`, or a mapping) into `model` in place; return it.

    Every tensor of the model must be given with its shape (BatchNorm's ``num_batches_tracked``
    may be absent, as in many published checkpoints), and nothing else.

    Raises:
        UserError: one line naming the missing, unexpected and mis-shaped tensors.
    """
    source = "the state dict" if isinstance(weights, Mapping) else str(weights)
    state = dict(weights) if isinstance(weights, Mapping) else read_state_dict(weights)
    want = model.state_dict()
    missing = [k for k in want if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in want]
    shaped = [k for k in want if k in state and tuple(state[k].shape) != tuple(want[k].shape)]
    kinds = [k for k in want if k in state and k not in shaped and dtype_kind(state[k].dtype) != dtype_kind(want[k].dtype)]
    if missing or unexpected or shaped or kinds:
        info = get_info(model)
        what = info.arch if info and info.arch else type(model).__name__
        args = ", ".join(f"{k}={v}" for k, v in info.arch_kwargs.items()) if info and info.arch else ""
        parts = []
        for label, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                parts.append(f"{len(names)} {label} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        if shaped:
            k = shaped[0]
            parts.append(f"{len(shaped)} mis-shaped ({k}: {list(state[k].shape)} in the file, {list(want[k].shape)} "
                         f"in the model{', ...' if len(shaped) > 1 else ''})")
        if kinds:
            parts.append(f"{len(kinds)} of another dtype ({kinds[0]}: {state[kinds[0]].dtype}, the model "
                         f"{want[kinds[0]].dtype})")
        raise UserError(one_line(f"{source} does not fit {what}{f' ({args})' if args else ''}: {'; '.join(parts)}",
                                 400 + len(source)))
    with torch.no_grad():
        _load_tensors(model, state, strict=False)
    return model
