"""Damaged and edited files: every mutant loads as the original or raises CorruptFileError/UserError.

Seeded mutants of four file kinds (a lenet5 model, a component cut from it, a padded assembly with
a density head, a profile): truncations, byte flips in the header and in the tensor data, edits
of the JSON header (a key deleted; a value set to null, a huge, negative or non-finite number, a
string, a deep nesting; two list items swapped), and two tensors swapped. Header edits are stored
with a recomputed header hash (so the checks behind the hash are what meets them), with the stale
hash, or in the previous format without one. No mutant may raise another exception, take more
than a few seconds, or load as something else than the original.
"""
from __future__ import annotations

import contextlib
import json
import random
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import modellego
from modellego.core.profile import Profile
from modellego.errors import CorruptFileError, UserError
from modellego.io.checkpoint import HEADER_HASH, header_hash
from modellego.io.info import InputSpec, get_info, set_info

from helpers import file_data, file_model

pytestmark = pytest.mark.filterwarnings("ignore:no class uses channel space")

MUTANTS = 300  # per file kind
SECONDS = 5  # per load: far above a normal one, far below a hang
_X = torch.randn(3, 3, 28, 28, generator=torch.Generator().manual_seed(5))


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise TimeoutError(f"still loading after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- The original files ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("originals")
    model = file_model("lenet5")
    set_info(model, get_info(model).replace(input=InputSpec(3, (28, 28), (0.1,) * 3, (0.3,) * 3), dataset="d"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prof = modellego.profile(model, file_data(), select=False)
        parts = [modellego.disassemble(model, c, profile=prof) for c in ([1, 3], [0, 2, 4])]
        assembly = modellego.assemble(parts)
        g = torch.Generator().manual_seed(3)
        modellego.scale_assembly(assembly, [(torch.randn(40, 3, 28, 28, generator=g), torch.arange(40) % 5)],
                                 method="density")
    assert get_info(assembly).assembly.mode == "padded" and get_info(assembly).assembly.density
    return {
        "model": modellego.save(model, folder / "model.safetensors"),
        "component": modellego.save(parts[0], folder / "component.safetensors"),
        "assembly": modellego.save(assembly, folder / "assembly.safetensors"),
        "profile": prof.save(folder / "p.profile"),
    }


def _key(kind: str) -> str:
    return "modellego-profile" if kind == "profile" else "modellego"


def _read(path: Path, key: str) -> tuple[dict[str, torch.Tensor], str]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()[key]


# --- Loading and comparing -----------------------------------------------------------------------------


def _load(kind: str, path: Path) -> Any:
    return Profile.load(path) if kind == "profile" else modellego.load(path)


def _same(kind: str, got: Any, want: Any, *, same_header: bool) -> str | None:
    """Why `got` is not the original (None if it is). Edited headers may differ in what they describe
    (a renamed class), never in the tensors or the outputs."""
    if kind == "profile":
        for attr in ("in_masks", "out_masks"):
            a, b = getattr(got, attr), getattr(want, attr)
            if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in b):
                return f"its {attr} differ"
        if same_header and (got.classes, got.thresholds, got.provenance) != (want.classes, want.thresholds, want.provenance):
            return "its header differs"
        return None
    a, b = got.state_dict(), want.state_dict()
    if a.keys() != b.keys() or any(a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k]) for k in b):
        return "its tensors differ"
    with torch.no_grad():
        if not torch.equal(got(_X), want(_X)):
            return "its outputs differ"
    if same_header and get_info(got) != get_info(want):
        return "its description differs"
    return None


# --- Mutations -----------------------------------------------------------------------------------------


_BIG = "__big__"
_DEEP = "__deep__"
_VALUES: list[Any] = [None, 10**30, -1, -(10**9), "x", "", 1e308, 0.5, True, [], {}, float("nan"), float("inf"),
                      _BIG, _DEEP, [[[[[[[[[[0]]]]]]]]]]]


def _nodes(obj: Any, path: tuple = ()) -> Iterator[tuple]:
    yield path
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _nodes(v, (*path, k))


def _edit(header: dict[str, Any], rng: random.Random) -> str:
    """Apply one random edit to `header` in place; return what it did."""
    path = rng.choice([p for p in _nodes(header) if p])
    parent = header
    for k in path[:-1]:
        parent = parent[k]
    last = path[-1]
    op = rng.choice(["delete", "set", "set", "set", "swap", "repeat"])
    if op == "delete":
        del parent[last]
    elif op in ("swap", "repeat") and isinstance(parent, list) and len(parent) > 1:
        other = rng.randrange(len(parent))
        if op == "swap":
            parent[last], parent[other] = parent[other], parent[last]
        else:
            parent.append(parent[other])
    else:
        op = "set"
        value = rng.choice(_VALUES)
        parent[last] = value
        return f"set {'.'.join(map(str, path))} to {str(value)[:20]}"
    return f"{op} {'.'.join(map(str, path))}"


def _raw(header: dict[str, Any]) -> str:
    """The header as text, with the values json.dumps cannot write (a 5000-digit number, 100k-deep nesting)."""
    return json.dumps(header).replace(f'"{_BIG}"', "9" * 5000).replace(f'"{_DEEP}"', "[" * 100_000 + "]" * 100_000)


def _legacy(header: dict[str, Any], kind: str) -> None:
    """The header as the previous format wrote it: no header hash."""
    header.pop(HEADER_HASH, None)
    header.pop("tensors_sha256", None)
    header["format_version"] = 1 if kind == "profile" else 2


def _mutant(kind: str, original: Path, rng: random.Random, out: Path) -> tuple[str, bool]:
    """Write one mutant of `original` to `out`; return what was done and whether the header is unchanged."""
    raw = original.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    how = rng.choice(["truncate", "flip header", "flip data", "edit", "edit", "edit stale", "edit legacy",
                      "swap tensors"])
    if how == "truncate":
        cut = rng.randrange(len(raw))
        out.write_bytes(raw[:cut])
        return f"truncated to {cut} of {len(raw)} bytes", True
    if how.startswith("flip"):
        lo, hi = (0, 8 + n) if how == "flip header" else (8 + n, len(raw))
        data = bytearray(raw)
        spots = [rng.randrange(lo, hi) for _ in range(rng.randint(1, 4))]
        for i in spots:
            data[i] ^= rng.randrange(1, 256)
        out.write_bytes(bytes(data))
        return f"{how} at {spots}", True
    key = _key(kind)
    tensors, meta = _read(original, key)
    header = json.loads(meta)
    if how == "swap tensors":
        same = [(a, b) for a in tensors for b in tensors if a < b and tensors[a].shape == tensors[b].shape
                and not torch.equal(tensors[a], tensors[b])]
        a, b = rng.choice(same or [tuple(rng.sample(sorted(tensors), 2))])
        tensors[a], tensors[b] = tensors[b], tensors[a]
        save_file(tensors, str(out), metadata={key: meta})
        return f"swapped tensors {a} and {b}", True
    if how == "edit legacy":
        _legacy(header, kind)
    what = _edit(header, rng)
    if how == "edit" and isinstance(header, dict) and HEADER_HASH in header:
        header[HEADER_HASH] = header_hash(header)  # stale where `_raw` then replaces a placeholder
    save_file(tensors, str(out), metadata={key: _raw(header)})
    return f"{how}: {what}", False


@pytest.mark.parametrize("kind", ["model", "component", "assembly", "profile"])
def test_mutants_load_as_the_original_or_raise_a_file_error(originals: dict[str, Path], tmp_path: Path, kind: str) -> None:
    torch.set_num_threads(1)
    original = originals[kind]
    want = _load(kind, original)
    rng = random.Random(f"fuzz-{kind}")
    out = tmp_path / original.name
    failures: list[str] = []
    outcomes = {"refused": 0, "loaded": 0}
    for i in range(MUTANTS):
        what, same_header = _mutant(kind, original, rng, out)
        try:
            with deadline(SECONDS):
                got = _load(kind, out)
        except (CorruptFileError, UserError) as e:
            outcomes["refused"] += 1
            msg = str(e)
            if "\n" in msg or len(msg) > 300 + len(str(out)) + 2:
                failures.append(f"#{i} {what}: a message of {len(msg)} characters / several lines: {msg[:200]!r}")
            continue
        except Exception as e:  # any other exception is what this test looks for
            failures.append(f"#{i} {what}: {type(e).__name__}: {str(e)[:300]}")
            continue
        outcomes["loaded"] += 1
        why = _same(kind, got, want, same_header=same_header)
        if why:
            failures.append(f"#{i} {what}: loaded, but {why}")
    assert not failures, f"{len(failures)} of {MUTANTS} mutants misbehaved:\n" + "\n".join(failures[:15])
    assert outcomes["refused"] > MUTANTS // 2  # the mutations really damage the files


# --- The original files themselves -------------------------------------------------------------------


def test_originals_load_exactly(originals: dict[str, Path]) -> None:
    for kind, path in originals.items():
        again = _load(kind, path)
        assert _same(kind, again, _load(kind, path), same_header=True) is None


def test_legacy_originals_still_load(originals: dict[str, Path], tmp_path: Path) -> None:
    """The previous format (no header hash) loads, as the same model or profile."""
    for kind, path in originals.items():
        key = _key(kind)
        tensors, meta = _read(path, key)
        header = json.loads(meta)
        _legacy(header, kind)
        old = tmp_path / path.name
        save_file(tensors, str(old), metadata={key: json.dumps(header)})
        assert _same(kind, _load(kind, old), _load(kind, path), same_header=True) is None
