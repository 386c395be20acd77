"""Model files: weights in safetensors, the `ModelInfo` as JSON in the safetensors header.

One ``.safetensors`` file is the whole model (a readable ``.json`` copy of the description is
written beside it). Loading never unpickles and never runs code: the architecture is rebuilt
from the zoo by name, pruned by the stored indices, then filled with the stored tensors.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__
from ._io import atomic_path, write_json
from .errors import CorruptFileError, UserError
from .info import ModelInfo, require_info, set_info

FORMAT = "modellego"
FORMAT_VERSION = 1
_META_KEY = "modellego"
DEFAULT_NAME = "model.safetensors"


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of names, dtypes, shapes and bytes of `tensors`, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def resolve_path(path: str | os.PathLike) -> Path:
    """A folder means the model file inside it."""
    p = Path(path)
    return p / DEFAULT_NAME if p.is_dir() or p.suffix == "" else p


def save(model: nn.Module, path: str | os.PathLike, *, info: ModelInfo | None = None) -> Path:
    """Save `model` (with its `ModelInfo`) to `path` atomically; return the file written.

    `path` may be a folder (``model.safetensors`` is written inside it) or a file name.
    """
    info = info or require_info(model, "saving")
    if info.arch is None and info.assembly is None:
        raise UserError("only models the zoo can rebuild can be saved: info.arch is None")
    path = resolve_path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    header: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "weights_sha256": weights_hash(tensors),
        "model": info.to_json(),
    }
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header)})
    write_json(path.with_suffix(".json"), header)
    return path


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The description stored in a model file, without loading its weights."""
    path = resolve_path(path)
    if not path.exists():
        raise UserError(f"no model file at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{path} is not a readable safetensors file ({e}); is it truncated?") from e
    if _META_KEY not in meta:
        raise CorruptFileError(f"{path} is a safetensors file but not a modellego model (no '{_META_KEY}' header)")
    try:
        header = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{path}: the model description is not valid JSON ({e})") from e
    if header.get("format") != FORMAT or not isinstance(header.get("model"), dict):
        raise CorruptFileError(f"{path}: not a modellego model description")
    version = header.get("format_version", 0)
    if not isinstance(version, int):
        raise CorruptFileError(f"{path}: format_version {version!r} is not an integer")
    if version > FORMAT_VERSION:
        raise CorruptFileError(
            f"{path} was written by a newer modellego (format {header['format_version']}); upgrade to read it"
        )
    return header


def skeleton(info: ModelInfo) -> nn.Module:
    """The module described by `info`, with the right shapes and arbitrary weights."""
    from .models import create_model
    from .prune import prune_layers

    if info.assembly is not None:
        from .assemble import assembly_skeleton
        return assembly_skeleton(info)
    if info.arch is None:
        raise UserError("no architecture recorded")
    model = create_model(info.arch, **info.arch_kwargs)
    if info.pruning:
        prune_layers(model, info.pruning)
    return model


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save`, in eval mode, with its `ModelInfo` attached.

    Raises:
        CorruptFileError: the file is truncated, corrupt, tampered with or not a modellego model.
    """
    path = resolve_path(path)
    header = read_header(path)
    try:
        info = ModelInfo.from_json(header["model"])
    except UserError as e:
        raise CorruptFileError(f"{path}: {e}") from e
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptFileError(f"{path}: cannot read the weights ({e}); the file may be truncated") from e
    if weights_hash(tensors) != header.get("weights_sha256"):
        raise CorruptFileError(f"{path}: the weights do not match their recorded hash (corrupt or modified file)")
    try:
        model = skeleton(info)
    except (UserError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CorruptFileError(f"{path}: the stored description cannot be rebuilt ({e})") from e
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CorruptFileError(f"{path}: the weights do not fit architecture {info.arch!r}: {e}") from e
    set_info(model, info)
    return model.to(map_location).eval()
