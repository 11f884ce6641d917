"""User-facing errors.

Both subclass ValueError, so library callers can catch them as bad input; the
CLI catches them and prints the message without a traceback.
"""
from __future__ import annotations


class ConfigError(ValueError):
    """A bad option value or combination of options (names the option)."""


class DataError(ValueError):
    """Bad training data: names the file and line, or the example index and field."""
