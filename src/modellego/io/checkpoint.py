"""Model files as bytes: weights in safetensors, the `ModelInfo` as JSON in the safetensors header.

One ``.safetensors`` file is the whole model (a readable ``.json`` copy of the description is
written beside it). This module only converts files to and from ``(ModelInfo, tensors)``;
`modellego.files` rebuilds the module. Reading never unpickles and never runs code.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import CorruptFileError, UserError
from .atomic import atomic_path, write_json
from .info import ModelInfo, weights_hash

FORMAT = "modellego"
# 2: an assembly's label map moved from the provenance into its AssemblySpec (1 still loads).
FORMAT_VERSION = 2
_META_KEY = "modellego"
DEFAULT_NAME = "model.safetensors"


def resolve_path(path: str | os.PathLike) -> Path:
    """A folder means the model file inside it."""
    p = Path(path)
    return p / DEFAULT_NAME if p.is_dir() or p.suffix == "" else p


def write_model(path: str | os.PathLike, info: ModelInfo, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` with `info` to `path` atomically; return the file written.

    `path` may be a folder (``model.safetensors`` is written inside it) or a file name.
    """
    path = resolve_path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
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


def read_model(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """The description and the tensors of a model file, checked against the recorded hash.

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
    return info, tensors
