"""Exception types. `UserError` marks mistakes the user can fix; the CLI prints them as one line."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class ModellegoError(Exception):
    """Base class of every error this library raises on purpose."""


class UserError(ModellegoError, ValueError):
    """Bad input: a wrong name, a bad argument, a missing or corrupt file."""


class UnknownNameError(UserError, KeyError):
    """A name (model, dataset, layer, class) that is not known."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class DataNotFoundError(UserError, FileNotFoundError):
    """A dataset that could not be found locally (and was not downloaded)."""


class CorruptFileError(UserError):
    """A file that is truncated, corrupt or not written by modellego."""


class UnsupportedGraphError(ModellegoError):
    """A graph operation that component locating or pruning does not understand."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> UnknownNameError:
    """Build an error for an unknown `name`, listing known names and close matches."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(known)}.")
