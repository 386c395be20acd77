"""Parsing task specifications: ``0-2``, ``3,5,7``, class names, or a mix."""
from __future__ import annotations

from collections.abc import Sequence

from ..errors import UserError, unknown_name


def _is_index(s: str) -> bool:
    """ASCII digits only: str.isdigit() also accepts '²' (which int() rejects) and other scripts' digits."""
    return s.isascii() and s.isdigit()


def parse_classes(spec: str, class_names: Sequence[str]) -> list[int]:
    """Class indices of `spec`, in the order written.

    Items are separated by commas; each is an index, a range ``a-b`` (inclusive) or a class name
    (case-insensitive). Duplicates, out-of-range indices and unknown names are errors.
    """
    n = len(class_names)
    by_name = {name.lower(): i for i, name in enumerate(class_names)}
    out: list[int] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            raise UserError(f"empty item in class list {spec!r}")
        if item.lower() in by_name and not _is_index(item):
            out.append(by_name[item.lower()])
        elif _is_index(item):
            out.append(int(item))
        elif "-" in item and all(_is_index(p.strip()) for p in item.split("-", 1)):
            a, b = (int(p) for p in item.split("-", 1))
            if b < a:
                raise UserError(f"empty class range {item!r}")
            out.extend(range(a, b + 1))
        else:
            raise unknown_name("class", item, class_names)
    bad = [c for c in out if not 0 <= c < n]
    if bad:
        raise UserError(f"classes {bad} are out of range: there are {n} classes (0-{n - 1})")
    dup = sorted({c for c in out if out.count(c) > 1})
    if dup:
        raise UserError(f"duplicate classes in {spec!r}: {dup}")
    return out


def format_classes(classes: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    parts: list[str] = []
    i = 0
    cs = list(classes)
    while i < len(cs):
        j = i
        while j + 1 < len(cs) and cs[j + 1] == cs[j] + 1:
            j += 1
        parts.append(str(cs[i]) if i == j else f"{cs[i]}-{cs[j]}")
        i = j + 1
    return ",".join(parts)
