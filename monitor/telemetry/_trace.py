"""W3C Trace Context (``traceparent``): parsed once where a request enters the sidecar.

A generation's trace context comes from its ``traceparent`` field (Score, a stream's first chunk
that has one, each Ingest item) or else from the call's ``traceparent`` gRPC metadata, which is
what OpenTelemetry's gRPC instrumentation injects. A malformed value is ignored, as the W3C
recommendation says a receiver does: a bad trace header must never cost the generation its verdict.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["TRACEPARENT", "TraceContext", "parse_traceparent", "trace_from_metadata"]

TRACEPARENT = "traceparent"
# version "-" trace-id "-" parent-id "-" flags; a future version may append "-" fields.
_FORMAT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


@dataclass(frozen=True)
class TraceContext:
    """The caller's span: what an evaluation event is parented to and an exemplar points at."""

    trace_id: str  # 32 lowercase hex digits, not all zero
    span_id: str  # 16 lowercase hex digits, not all zero
    flags: int = 0  # bit 0: sampled

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags:02x}"

    @property
    def exemplar(self) -> dict[str, str]:
        """Prometheus exemplar labels (OpenMetrics), as Grafana's trace links read them."""
        return {"trace_id": self.trace_id, "span_id": self.span_id}


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The context in a ``traceparent`` value; None when it is empty or malformed (then ignored)."""
    if not value or len(value) > 512:
        return None
    m = _FORMAT.match(value.strip())
    if m is None:
        return None
    version, trace_id, span_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return TraceContext(trace_id, span_id, int(flags, 16))


def trace_from_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> tuple[TraceContext | None, bool]:
    """(the context in the call's ``traceparent`` metadata, whether a value was there but malformed)."""
    for key, value in metadata or ():
        if key == TRACEPARENT:
            text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            ctx = parse_traceparent(text)
            return ctx, ctx is None
    return None, False
