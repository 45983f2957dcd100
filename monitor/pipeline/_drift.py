"""Glue between scoring and ``monitor.drift``: what a finished generation adds to the drift windows.

Scoring never touches drift. The server records a generation once it is acknowledged (its audit
record durable, ``monitor.server._acknowledge``), so evaluation and benches that call
``Pipeline.score`` leave the drift state alone, and a retried request is not counted twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import TypeVar

from monitor.detectors import DetectorResult
from monitor.drift import DriftMonitor
from monitor.pipeline._types import ScoreResult, StreamVerdict

__all__ = ["DETECTOR_PREFIX", "drift_values", "observe_drift"]

R = TypeVar("R", ScoreResult, StreamVerdict)
DETECTOR_PREFIX = "detector."  # drift metrics of detector verdicts (they depend on the bundle)


def drift_values(text_stats: Mapping[str, float], detectors: Sequence[DetectorResult]) -> dict[str, float]:
    """What the drift engine tracks of one finished generation: its text statistics and detector verdicts."""
    values = {f"text.{k}": v for k, v in text_stats.items()}
    for r in detectors:
        values[f"{DETECTOR_PREFIX}{r.name}.probability"] = r.probability
        values[f"{DETECTOR_PREFIX}{r.name}.fired"] = float(r.fired)
    return values


def observe_drift(drift: DriftMonitor, result: R) -> R:
    """Record a finished generation in ``drift``; returns the result with the change points it caused.

    A stream verdict that is not final is returned as it is: only whole generations count.
    """
    if isinstance(result, StreamVerdict) and not result.final:
        return result
    changes = tuple(drift.update(drift_values(result.text_stats, result.detectors)))
    return dataclasses.replace(result, change_points=changes) if changes else result
