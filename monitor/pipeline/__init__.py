"""The per-request path: validate -> decode -> detectors -> text statistics -> result objects.

The server and the bulk paths call ``Pipeline.score`` for a finished generation and
``Pipeline.open_stream`` for a running one; results are plain dataclasses that ``monitor.metrics``
and ``monitor.audit`` read. Modules: ``_types`` (inputs and results), ``_validate`` (boundary
checks), ``_evidence`` (the block loop), ``_halt`` (HALT policy), ``_scorer`` (Pipeline,
StreamScorer), ``_drift`` (what a generation adds to drift).
"""

from __future__ import annotations

from monitor.hook_points import HookStats
from monitor.pipeline._drift import DETECTOR_PREFIX, drift_values, observe_drift
from monitor.pipeline._evidence import Evidence
from monitor.pipeline._halt import halt_reason
from monitor.pipeline._scorer import Pipeline, StreamScorer
from monitor.pipeline._types import ActivationInput, ChunkInput, Limits, ScoreInput, ScoreResult, StreamVerdict

__all__ = [
    "DETECTOR_PREFIX",
    "ActivationInput",
    "ChunkInput",
    "Evidence",
    "HookStats",
    "Limits",
    "Pipeline",
    "ScoreInput",
    "ScoreResult",
    "StreamScorer",
    "StreamVerdict",
    "drift_values",
    "halt_reason",
    "observe_drift",
]
