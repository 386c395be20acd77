"""Files as bytes: tensors in safetensors, a JSON description in the safetensors header.

One ``.safetensors`` file is the whole model; a readable ``.json`` copy of its header is written
beside it *after* it, for people only: nothing reads the copy back (it may be stale or missing).
This module converts model files to and from ``(ModelInfo, tensors)``; `modellego.files`
rebuilds the module. Reading never unpickles and never runs code.

Every file kind (model, component and assembly files here, `Profile` files in
`modellego.core.profile`) is read through one checked path, `open_checked`, in this order:

1. a regular file whose safetensors header is at most `MAX_HEADER_BYTES`, fully inside the file;
2. a tensor table that safetensors accepts;
3. the JSON description, nested at most `MAX_DEPTH` deep (counted before it is parsed);
4. its ``format`` name and a ``format_version`` this library reads; from the version that
   introduced it, ``header_sha256``, the SHA-256 of the canonical JSON of every other header field;
5. the caller's checks of the description and of the tensor table (names, shapes, dtypes),
   before any tensor data is read;
6. the tensors, compared to their recorded SHA-256.

Any failure is a `CorruptFileError` of one short line naming the file (a missing file is a
`UserError`). The hashes catch damage and edits, not a forger: anyone can recompute a SHA-256.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .._version import __version__
from ..errors import CorruptFileError, UserError
from .atomic import atomic_path, write_json
from .info import ModelInfo, weights_hash

log = logging.getLogger(__name__)

FORMAT = "modellego"
# 2: an assembly's label map moved from the provenance into its AssemblySpec (1 still loads).
# 3: `header_sha256` covers the description (2 and 1 still load, without that check).
FORMAT_VERSION = 3
HASHED_SINCE = 3
_META_KEY = "modellego"
DEFAULT_NAME = "model.safetensors"

MAX_HEADER_BYTES = 16 * 2**20  # the safetensors header: tensor table plus our description
MAX_DEPTH = 64  # nesting of arrays and objects in the description
MESSAGE_LIMIT = 300  # characters of foreign text (a value, a library's message) quoted in an error
HEADER_HASH = "header_sha256"

_READ_ERRORS = (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError)
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_INT_DTYPES = {"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8"}
# A JSON string, or an unterminated one up to the end: it matches from every quote, and possessive
# loops never backtrack, so stripping the strings of a text is one pass over it.
_JSON_STRING = re.compile(r'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.S)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def one_line(text: object, limit: int = MESSAGE_LIMIT) -> str:
    """`text` on one line, cut to `limit` characters."""
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def canonical_hash(obj: Any) -> str:
    """SHA-256 of the canonical JSON of `obj` (sorted keys, no spaces, ASCII)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def header_hash(header: Mapping[str, Any]) -> str:
    """The ``header_sha256`` of a header: the canonical hash of every other field."""
    return canonical_hash({k: v for k, v in header.items() if k != HEADER_HASH})


def hashed_header(fields: Mapping[str, Any]) -> dict[str, Any]:
    """`fields` as stored (JSON types only), with their ``header_sha256`` added."""
    header = json.loads(json.dumps(dict(fields)))  # tuples -> lists, int keys -> str: what a reader sees
    header[HEADER_HASH] = header_hash(header)
    return header


def json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects in JSON `text`, found without parsing it.

    Brackets inside strings do not count. Linear in the length of `text`.
    """
    skeleton = _JSON_STRING.sub('""', text).encode("utf-8", "replace")
    b = np.frombuffer(skeleton, dtype=np.uint8)
    step = ((b == ord("[")) | (b == ord("{"))).astype(np.int32) - ((b == ord("]")) | (b == ord("}")))
    return int(np.cumsum(step).max()) if len(step) else 0


class StoredTensor(NamedTuple):
    """A tensor as the safetensors table describes it, before its data is read."""

    dtype: str  # safetensors' name: "F32", "I64", "U8", "BOOL", ...
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:
        """``float``, ``int``, ``bool`` or ``other``."""
        if self.dtype in _FLOAT_DTYPES:
            return "float"
        if self.dtype in _INT_DTYPES:
            return "int"
        return "bool" if self.dtype == "BOOL" else "other"


def dtype_kind(dtype: torch.dtype) -> str:
    """The `StoredTensor.kind` of a torch dtype."""
    if dtype.is_floating_point:
        return "float"
    return "bool" if dtype == torch.bool else "other" if dtype.is_complex else "int"


class StoredFile:
    """A file opened by `open_checked`: its checked header, its tensor table, its tensors on demand."""

    def __init__(self, path: Path, handle: Any, header: dict[str, Any], version: int,
                 table: dict[str, StoredTensor]) -> None:
        self.path = path
        self.header = header
        self.version = version
        self.table = table
        self._handle = handle

    def corrupt(self, message: object) -> CorruptFileError:
        """A `CorruptFileError` for this file: one line, foreign text cut short."""
        return corrupt(self.path, message)

    def read_tensors(self, expected_sha256: str | None) -> dict[str, torch.Tensor]:
        """Every tensor, checked against `expected_sha256` (`weights_hash`) unless it is ``None``."""
        try:
            tensors = {k: self._handle.get_tensor(k) for k in self.table}
        except _READ_ERRORS as e:
            raise self.corrupt(f"cannot read the tensors ({one_line(e)}); the file may be truncated") from e
        if expected_sha256 is not None and weights_hash(tensors) != expected_sha256:
            raise self.corrupt("the tensors do not match their recorded hash (corrupt or modified file)")
        return tensors


def corrupt(path: Path, message: object) -> CorruptFileError:
    return CorruptFileError(one_line(f"{path}: {message}", MESSAGE_LIMIT + len(str(path)) + 2))


def _check_container(path: Path, what: str, missing: str) -> None:
    """A regular file with a safetensors header of a size this library could have written."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise UserError(f"{missing} {path}") from None
    except OSError as e:
        raise corrupt(path, f"cannot be read ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise corrupt(path, f"is not a regular file, so not a modellego {what}")
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError as e:
        raise corrupt(path, f"cannot be read ({e.strerror or e})") from e
    if len(head) < 8:
        raise corrupt(path, f"is not a readable safetensors file ({st.st_size} bytes); is it truncated?")
    n = int.from_bytes(head, "little")
    if n > MAX_HEADER_BYTES:
        raise corrupt(path, f"is not a readable safetensors file: its header would be {n} bytes, more than the "
                            f"{MAX_HEADER_BYTES} this library reads")
    if 8 + n > st.st_size:
        raise corrupt(path, f"is not a readable safetensors file: the header runs past the end ({st.st_size} bytes); "
                            "is it truncated?")


@contextlib.contextmanager
def open_checked(path: str | os.PathLike, *, key: str, fmt: str, version: int, hashed_since: int,
                 what: str, missing: str) -> Iterator[StoredFile]:
    """Open a file of this library for checked reading (steps 1-4 of the module docstring).

    Args:
        key: the safetensors metadata key holding the JSON header.
        fmt: the header's ``format``; version: the newest ``format_version`` read.
        hashed_since: the first version whose header carries ``header_sha256``.
        what: the file kind in messages ("model", "profile"); missing: the message start for a missing file.

    Raises:
        UserError: no file at `path`.
        CorruptFileError: anything else; the tensors are read later, by `StoredFile.read_tensors`.
    """
    path = Path(path)
    _check_container(path, what, missing)
    with contextlib.ExitStack() as stack:
        try:
            handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            meta = handle.metadata() or {}
            table = {k: StoredTensor(handle.get_slice(k).get_dtype(), tuple(handle.get_slice(k).get_shape()))
                     for k in handle.keys()}
        except _READ_ERRORS as e:
            raise corrupt(path, f"is not a readable safetensors file ({one_line(e)}); is it truncated?") from e
        if key not in meta:
            raise corrupt(path, f"is a safetensors file but not a modellego {what} (no '{key}' header)")
        header = _parse(path, meta[key], what)
        if not isinstance(header, dict) or header.get("format") != fmt:
            raise corrupt(path, f"not a modellego {what} description (format is not {fmt!r})")
        v = header.get("format_version")
        if isinstance(v, bool) or not isinstance(v, int):
            raise corrupt(path, f"format_version {one_line(repr(v), 40)} is not an integer")
        if v > version:
            raise corrupt(path, f"was written by a newer modellego (format {v}; this one reads up to {version}); "
                                "upgrade to read it")
        if v < 1:
            raise corrupt(path, f"format_version {v} is not a version modellego ever wrote")
        if v >= hashed_since and header.get(HEADER_HASH) != header_hash(header):
            raise corrupt(path, "the description does not match its hash: the file was edited or damaged")
        yield StoredFile(path, handle, header, v, table)


def _parse(path: Path, text: str, what: str) -> Any:
    """JSON `text`, its nesting bounded before the parser can recurse."""
    depth = json_depth(text)
    if depth > MAX_DEPTH:
        raise corrupt(path, f"the {what} description is nested {depth} deep, more than the {MAX_DEPTH} allowed")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, or an integer of over 4300 digits
        raise corrupt(path, f"the {what} description is not valid JSON ({one_line(e)})") from e


# --- Model files ------------------------------------------------------------------------------------


def resolve_path(path: str | os.PathLike) -> Path:
    """A folder means the model file inside it."""
    p = Path(path)
    return p / DEFAULT_NAME if p.is_dir() or p.suffix == "" else p


def write_model(path: str | os.PathLike, info: ModelInfo, tensors: dict[str, torch.Tensor]) -> Path:
    """Write `tensors` with `info` to `path` atomically; return the file written.

    `path` may be a folder (``model.safetensors`` is written inside it) or a file name. The
    readable ``.json`` copy of the header is written after the model file.
    """
    path = resolve_path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    header = hashed_header({
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "torch_version": torch.__version__,
        "weights_sha256": weights_hash(tensors),
        "model": info.to_json(),
    })
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META_KEY: json.dumps(header)})
    sidecar = path.with_suffix(".json")
    try:
        write_json(sidecar, header)
    except OSError as e:  # the model is saved; a stale copy beside it would mislead
        with contextlib.suppress(OSError):
            sidecar.unlink(missing_ok=True)
        log.warning("saved %s, but not its readable copy %s (%s)", path, sidecar, e)
    return path


class ModelFile(StoredFile):
    """A model file opened by `open_model`: `info` is its checked description."""

    def __init__(self, f: StoredFile, info: ModelInfo) -> None:
        super().__init__(f.path, f._handle, f.header, f.version, f.table)
        self.info = info

    def weights(self) -> dict[str, torch.Tensor]:
        """Every tensor, checked against the recorded ``weights_sha256``."""
        return self.read_tensors(self.header["weights_sha256"])


@contextlib.contextmanager
def open_model(path: str | os.PathLike) -> Iterator[ModelFile]:
    """Open a model file: checked header and description, tensor table; tensors on demand.

    Raises:
        UserError: no file at `path`.
        CorruptFileError: the file is truncated, corrupt, edited or not a modellego model.
    """
    path = resolve_path(path)
    with open_checked(path, key=_META_KEY, fmt=FORMAT, version=FORMAT_VERSION, hashed_since=HASHED_SINCE,
                      what="model", missing="no model file at") as f:
        header = f.header
        for k in ("library_version", "torch_version"):
            if k in header and not isinstance(header[k], str):
                raise f.corrupt(f"malformed header: {k} is not a string")
        if not isinstance(header.get("weights_sha256"), str) or not _HEX64.fullmatch(header["weights_sha256"]):
            raise f.corrupt("malformed header: weights_sha256 is not a SHA-256 hex digest")
        try:
            info = ModelInfo.from_json(header.get("model"))
        except UserError as e:
            raise f.corrupt(e) from e
        yield ModelFile(f, info)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The header stored in a model file (its description checked), without reading its tensors."""
    with open_model(path) as f:
        return f.header


def read_model(path: str | os.PathLike) -> tuple[ModelInfo, dict[str, torch.Tensor]]:
    """The description and the tensors of a model file, checked against the recorded hashes.

    Raises:
        CorruptFileError: the file is truncated, corrupt, tampered with or not a modellego model.
    """
    with open_model(path) as f:
        return f.info, f.weights()
