"""User-facing errors: the CLI prints them as one clear message, never as a traceback.

Every error that a user's file can cause names where it came from: the file, the line (recipes) or
row (data), and the key or field.
"""

from __future__ import annotations


class AlignError(Exception):
    """A mistake in the user's input or setup, with a message meant for a person."""


class ConfigError(AlignError):
    """A recipe problem: `file:line: key: message`."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None, key: str | None = None):
        self.message, self.file, self.line, self.key = message, file, line, key
        where = ":".join(str(p) for p in (file, line) if p is not None)
        parts = [p for p in (where, f"'{key}'" if key else None, message) if p]
        super().__init__(": ".join(parts))


class DataError(AlignError):
    """A data problem: `file, row N, field 'f': message` (rows count from 1, as editors show lines)."""

    def __init__(self, message: str, *, file: str | None = None, row: int | None = None, field: str | None = None):
        self.message, self.file, self.row, self.field = message, file, row, field
        parts = [str(file)] if file else []
        if row is not None:
            parts.append(f"row {row}")
        if field:
            parts.append(f"field '{field}'")
        super().__init__(", ".join(parts) + (": " if parts else "") + message)


def require(ok: bool, key: str, message: str) -> None:
    """A config check: raise `ConfigError(message, key=key)` unless `ok`."""
    if not ok:
        raise ConfigError(message, key=key)


class StagePruned(Exception):
    """Raised by whoever watches a stage train (an `align sweep` trial's pruner) to end it early: the stage is recorded
    `pruned`, never `done`, and the run stops there. Not a user mistake, so not an AlignError."""
