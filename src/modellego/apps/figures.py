"""Writing the applications' matplotlib figures (route diagrams, compression trade-offs)."""
from __future__ import annotations

import os
from pathlib import Path

from matplotlib.figure import Figure

from ..errors import UserError
from ..io.atomic import atomic_path

FORMATS = ("png", "svg", "pdf")


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 150) -> Path:
    """Write `fig` to `path` atomically; the format comes from the suffix (png, svg or pdf)."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FORMATS:
        raise UserError(f"figures are written as {', '.join(FORMATS)}; got {path.name!r}")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
    return path
