"""Where benchmark measurements go: one JSON row per line, appended, and echoed to stderr."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def record(row: dict, path: Path, *, echo: bool = True) -> None:
    """Append `row` to the JSON-lines file `path` (and print it on stderr while the script runs)."""
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    if echo:
        print(json.dumps(row), file=sys.stderr, flush=True)
