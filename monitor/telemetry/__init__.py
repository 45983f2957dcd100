"""OpenTelemetry: the trace context a generation arrives with, and its verdicts as GenAI evaluation events.

``OtlpEvents`` (the exporter) imports the OpenTelemetry SDK only when it is constructed: the
``otel`` extra is optional and never part of the thin client.
"""

from monitor.telemetry._events import EVALUATION_RESULT, SCHEMA_URL, SEMCONV_VERSION, Event, evaluation_events
from monitor.telemetry._otlp import OtlpEvents, check_endpoint
from monitor.telemetry._trace import TRACEPARENT, TraceContext, parse_traceparent, trace_from_metadata

__all__ = [
    "EVALUATION_RESULT",
    "SCHEMA_URL",
    "SEMCONV_VERSION",
    "TRACEPARENT",
    "Event",
    "OtlpEvents",
    "TraceContext",
    "check_endpoint",
    "evaluation_events",
    "parse_traceparent",
    "trace_from_metadata",
]
