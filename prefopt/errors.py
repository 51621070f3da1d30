"""Errors that prefopt raises for bad user input.

Every error names where the problem is: a config key (with the closest valid key), or a data
file, row and field. They derive from :class:`PrefoptError` so the CLI can print them without a
traceback.
"""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class PrefoptError(Exception):
    """Base class of errors caused by user input (recipes, data, paths)."""


class ConfigError(PrefoptError):
    """A recipe or override is invalid: unknown key, wrong type, missing role, bad value."""


class DataError(PrefoptError):
    """A data row is malformed. The message names the file, the row and the field."""

    def __init__(self, message: str, *, source: str | None = None, row: int | None = None,
                 field: str | None = None):
        where = []
        if source is not None:
            where.append(f"file {source}")
        if row is not None:
            where.append(f"row {row}")
        if field is not None:
            where.append(f"field '{field}'")
        prefix = (", ".join(where) + ": ") if where else ""
        super().__init__(prefix + message)
        self.source, self.row, self.field = source, row, field


class RunInterrupted(PrefoptError):
    """SIGTERM / Ctrl-C stopped a run after writing a checkpoint (the message says where)."""


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate most similar to ``name``, or None if nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or an empty string."""
    best = closest(name, candidates)
    return f" (did you mean '{best}'?)" if best else ""
