"""Atomic file writes: a temporary file in the same folder, then `os.replace`.

The temporary is ``.{name}.XXXXXXXX.tmp`` beside the destination. It is removed on any exception;
one left by a killed process is removed by a later write to the same destination once it is older
than `STALE_AFTER_S` (a younger one may belong to a write still under way).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

STALE_AFTER_S = 600.0


def sweep_temporaries(path: str | os.PathLike, *, older_than: float = STALE_AFTER_S) -> list[Path]:
    """Remove the temporaries of writes to `path` that were never finished; return those removed.

    Only regular files named like `atomic_path`'s temporaries of this destination, and not
    modified for `older_than` seconds, are touched.
    """
    path = Path(path)
    # tempfile.mkstemp's random part: 8 characters of [a-z0-9_].
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    removed: list[Path] = []
    now = time.time()
    try:
        entries = list(os.scandir(path.parent))
    except OSError:
        return removed
    for entry in entries:
        if not ours.fullmatch(entry.name):
            continue
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime >= older_than:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; move it into place only if the block succeeds.

    An interrupted or failed write never leaves a half-written file under `path`, and the
    temporary is removed whatever the block raises.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp creates 0600; give the file the permissions a plain open() would (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
