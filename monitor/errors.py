"""Errors shared across the sidecar.

MonitorError
 ├── InvalidInput (also a ValueError)  bad request content -> INVALID_ARGUMENT on the wire
 └── ConfigError (also a ValueError)    bad configuration file / environment / flag
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

MAX_ECHO = 160  # hostile values are echoed in errors and logs: never more than this many characters

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxtuple, _REPR.maxset = 3, 8, 8, 8, 8
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = MAX_ECHO


def echo(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)`` cut to ``limit`` characters without building the whole repr first (an
    aliased YAML list can stand for millions of items).

    >>> echo("x" * 500, 20)
    "'xxxxxxxxxxxxxxxxxx... (cut at 20 characters)"
    >>> echo([[1, 2]] * 10**9)
    '[[1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], [1, 2], ...]'
    """
    text = _REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 1]}... (cut at {limit} characters)"


def read_json_object(path: Path, error: type[Exception], what: str = "a JSON object") -> dict[str, Any]:
    """A JSON file that must hold an object, or ``error`` naming the file in one line (never a
    decoder traceback, never a whole hostile document echoed)."""
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise error(f"{path}: expected {what}, unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise error(f"{path}: expected {what}, got {type(doc).__name__} {echo(doc)}")
    return doc


class MonitorError(Exception):
    """Base of every error the sidecar raises on purpose."""


class InvalidInput(MonitorError, ValueError):
    """A request field is malformed; the message names the field, expected and received values."""

    MAX_ECHO = MAX_ECHO

    def __init__(self, field: str, expected: str, received: str, *, reason: str = "invalid") -> None:
        if len(received) > self.MAX_ECHO:
            received = f"{received[: self.MAX_ECHO]}... ({len(received)} characters)"
        if len(field) > self.MAX_ECHO:
            field = f"{field[: self.MAX_ECHO]}..."
        self.field = field
        self.expected = expected
        self.received = received
        # A bounded keyword used as a metric label (never the field path itself).
        self.reason = reason
        super().__init__(f"{field}: expected {expected}, got {received}")


class ConfigError(MonitorError, ValueError):
    """A configuration value is invalid; the message names the key and the allowed values."""
