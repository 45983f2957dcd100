"""Verdicts as OpenTelemetry GenAI evaluation events (``gen_ai.evaluation.result``).

One event per detector that reported on a finished generation, one per HALT when it is decided,
one per debate verdict. Attributes follow the GenAI semantic conventions as published in schema
``SEMCONV_VERSION`` (the Python package ``opentelemetry-semantic-conventions`` 0.66b2); those
attributes are still at stability "development", so a later release may rename them: the names
are pinned here, and tests/unit/test_telemetry.py checks them against the installed package.

What each attribute holds (docs/observability.md):

- ``gen_ai.evaluation.name``: the detector (``harmful_compliance.sae_probe``), ``safety_monitor.halt``
  or ``safety_monitor.debate``;
- ``gen_ai.evaluation.score.value``: the calibrated probability (the judge's confidence for a debate);
- ``gen_ai.evaluation.score.label``: ``fired`` / ``not_fired``; ``halt``; the debate's verdict;
- ``gen_ai.evaluation.explanation``: the top SAE latents' labels and shares (none for dense probes);
- ``gen_ai.response.id``: the generation's request id.

This module builds plain ``Event`` values and imports nothing from OpenTelemetry: the exporter
(``_otlp``) turns them into log records off the scoring path.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from monitor.detectors import DetectorResult
from monitor.pipeline import ScoreResult, StreamVerdict
from monitor.telemetry._trace import TraceContext

__all__ = [
    "EVALUATION_RESULT",
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "Event",
    "debate_event",
    "evaluation_events",
    "halt_event",
]

SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
EVALUATION_RESULT = "gen_ai.evaluation.result"
NAME = "gen_ai.evaluation.name"
SCORE_VALUE = "gen_ai.evaluation.score.value"
SCORE_LABEL = "gen_ai.evaluation.score.label"
EXPLANATION = "gen_ai.evaluation.explanation"
RESPONSE_ID = "gen_ai.response.id"
REQUEST_MODEL = "gen_ai.request.model"
ERROR_TYPE = "error.type"
HALT_NAME = "safety_monitor.halt"
DEBATE_NAME = "safety_monitor.debate"
TOP_LATENTS = 3  # latents named in an explanation

Attributes = dict[str, str | int | float | bool]


@dataclass(frozen=True)
class Event:
    """One event: its name, attributes, severity (``INFO`` or ``WARN``) and the trace it belongs to."""

    name: str
    attributes: Attributes
    severity: str
    trace: TraceContext | None


def evaluation_events(rpc: str, result: ScoreResult | StreamVerdict, trace: TraceContext | None) -> list[Event]:
    """An event per detector that reported on a finished generation."""
    return [_detector_event(rpc, result.request_id, result.model, d, trace) for d in result.detectors]


def halt_event(rpc: str, verdict: StreamVerdict, trace: TraceContext | None) -> Event:
    """The HALT just decided on a running generation, and why."""
    fired = [d for d in verdict.detectors if d.fired and d.critical]
    attrs: Attributes = {
        NAME: HALT_NAME,
        SCORE_LABEL: "halt",
        EXPLANATION: verdict.reason,
        RESPONSE_ID: verdict.request_id,
        REQUEST_MODEL: verdict.model,
        "safety_monitor.rpc": rpc,
        "safety_monitor.tokens_seen": verdict.tokens_seen,
        "safety_monitor.chunk_index": verdict.chunk_index,
    }
    if fired:
        attrs[SCORE_VALUE] = max(float(d.probability) for d in fired)
        attrs["safety_monitor.detectors"] = ",".join(d.name for d in fired)
    return Event(EVALUATION_RESULT, attrs, "WARN", trace)


def debate_event(record: Mapping[str, Any], trace: TraceContext | None) -> Event | None:
    """A debate's outcome (its audit record, ``monitor.debate``); None for other records."""
    if record.get("type") != "debate":
        return None
    detectors = record.get("detectors") or {}
    attrs: Attributes = {
        NAME: DEBATE_NAME,
        RESPONSE_ID: str(record.get("request_id", "")),
        EXPLANATION: "critical detectors debated: " + ", ".join(sorted(detectors)),
    }
    if record.get("outcome") == "ok":
        attrs[SCORE_LABEL] = str(record.get("verdict", ""))
        confidence = record.get("judge_confidence")
        if isinstance(confidence, int | float):
            attrs[SCORE_VALUE] = float(confidence)
    else:
        attrs[ERROR_TYPE] = str(record.get("outcome", "error"))
    return Event(EVALUATION_RESULT, attrs, "INFO", trace)


def _detector_event(rpc: str, request_id: str, model: str, d: DetectorResult, trace: TraceContext | None) -> Event:
    attrs: Attributes = {
        NAME: d.name,
        SCORE_VALUE: float(d.probability),
        SCORE_LABEL: "fired" if d.fired else "not_fired",
        RESPONSE_ID: request_id,
        REQUEST_MODEL: model,
        "safety_monitor.rpc": rpc,
        "safety_monitor.behaviour": d.behaviour,
        "safety_monitor.score": float(d.score),
        "safety_monitor.threshold": float(d.threshold),
        "safety_monitor.critical": bool(d.critical),
        "safety_monitor.reads": d.reads,
    }
    if d.top_features:
        attrs[EXPLANATION] = "; ".join(
            f"latent {f.latent} {f.label!r} {f.contribution:+.3f}" for f in d.top_features[:TOP_LATENTS]
        )
    return Event(EVALUATION_RESULT, attrs, "WARN" if d.fired and d.critical else "INFO", trace)
