"""Model files back to modules: `save`, `load`, and `build`, which rebuilds any file's module.

A file stores a description (`ModelInfo`) and tensors (`modellego.io.checkpoint`). `build` turns
the description into a module of the right shapes: a zoo architecture, pruned by the stored plan,
or an assembly of such modules. Nothing is unpickled and no stored code runs.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from .assembly.assemble import assembly_skeleton
from .cut.prune import prune_layers
from .errors import CorruptFileError, UserError
from .io.checkpoint import read_model, resolve_path, write_model
from .io.info import ModelInfo, require_info, set_info
from .models import create_model


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


def save(model: nn.Module, path: str | os.PathLike, *, info: ModelInfo | None = None) -> Path:
    """Save `model` (with its `ModelInfo`) to `path` atomically; return the file written.

    `path` may be a folder (``model.safetensors`` is written inside it) or a file name.
    """
    info = info or require_info(model, "saving")
    if info.arch is None and info.assembly is None:
        raise UserError("only models the zoo can rebuild can be saved: info.arch is None")
    return write_model(path, info, model.state_dict())


def load(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by `save`, in eval mode, with its `ModelInfo` attached.

    Raises:
        CorruptFileError: the file is truncated, corrupt, tampered with or not a modellego model.
    """
    path = resolve_path(path)
    info, tensors = read_model(path)
    try:
        model = build(info)
    except (UserError, KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        raise CorruptFileError(f"{path}: the stored description cannot be rebuilt ({e})") from e
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CorruptFileError(f"{path}: the weights do not fit architecture {info.arch!r}: {e}") from e
    set_info(model, info)
    return model.to(map_location).eval()
