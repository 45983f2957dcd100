"""Errors shared across the sidecar.

MonitorError
 ├── InvalidInput (also a ValueError)  bad request content -> INVALID_ARGUMENT on the wire
 └── ConfigError (also a ValueError)    bad configuration file / environment / flag
"""

from __future__ import annotations


class MonitorError(Exception):
    """Base of every error the sidecar raises on purpose."""


class InvalidInput(MonitorError, ValueError):
    """A request field is malformed; the message names the field, expected and received values."""

    MAX_ECHO = 160  # hostile values are echoed in errors and logs: never more than this

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
