"""User-facing errors.

Both subclass ValueError, so library callers can catch them as bad input; the
CLI catches them and prints the message without a traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value or combination of options (names the option)."""


class DataError(ValueError):
    """Bad training data: names the file and line, or the example index and field."""


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that cannot be written); the message says
    why and what to do. The CLI prints it in one line and exits 1."""
