"""The drift state file's schema: every field's type checked on load, before any of it is used.

A state that loads must never fail later: a reference of ``"abc"`` used to load, report SERVING,
then make every Score INTERNAL and ``/metrics`` HTTP 500. ``parse_state`` checks the whole
document (types, finite numbers, a frozen reference is not empty) and raises ``DriftStateError``
naming the first bad field, so the caller can move the file aside or refuse to start.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from monitor.errors import echo

__all__ = ["STATE_VERSION", "DriftStateError", "MetricState", "StateDocument", "parse_state"]

STATE_VERSION = 1

Finite = Annotated[float, Field(allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]


class DriftStateError(ValueError):
    """A drift state (or baseline) file is unreadable or does not match the schema."""


class _Strict(BaseModel):
    # strict: "1" is not a number, 1 is not a boolean; unknown keys are ignored (written by a newer
    # sidecar of the same version, they carry nothing this one uses)
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class DetectorState(_Strict):
    """A Page-Hinkley detector's state (``monitor.drift.PageHinkley`` fields)."""

    delta: Finite
    threshold: Finite
    min_instances: Count
    n: Count
    mean: Finite
    up: Finite
    up_min: Finite
    down: Finite
    down_max: Finite
    n_detections: Count
    drift_detected: bool
    direction: Literal["", "up", "down"]


class MetricState(_Strict):
    """One statistic: its reference sample, current window and change detector."""

    reference: list[Finite]
    reference_frozen: bool
    window: list[Finite]
    detector: DetectorState | None = None
    change_points: Count = 0

    @model_validator(mode="after")
    def _frozen_needs_values(self) -> MetricState:
        if self.reference_frozen and not self.reference:
            raise ValueError("reference: expected values when reference_frozen is true, got none")
        return self


class StateDocument(_Strict):
    """The whole file: ``{"version": 1, "events": n, "bundle": id, "metrics": {name: MetricState}}``."""

    version: Literal[1]
    events: Count = 0
    bundle: str = ""
    metrics: dict[str, MetricState]


def parse_state(path: Path) -> StateDocument:
    """Read and validate ``path``; raises ``DriftStateError`` naming the file and the first bad field.

    ``OSError`` (a missing or unreadable file) passes through: that is not a corrupt state.
    """
    text = path.read_bytes()
    try:
        doc: Any = json.loads(text)
    except (ValueError, RecursionError) as exc:  # truncated, empty, garbage, nested too deep
        raise DriftStateError(f"drift state {path}: expected a JSON object, got unreadable JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise DriftStateError(f"drift state {path}: expected a JSON object, got {_kind(doc)}")
    if doc.get("version") != STATE_VERSION:
        raise DriftStateError(f"drift state {path}: version: expected {STATE_VERSION}, got {echo(doc.get('version'))}")
    try:
        return StateDocument.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").replace("Input should be ", "expected ", 1)
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise DriftStateError(f"drift state {path}: {loc}: {msg}, got {echo(err['input'])}{more}") from None


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def _kind(value: Any) -> str:
    return "null" if value is None else f"a JSON {_JSON_TYPES.get(type(value), 'value')} {echo(value)}"
