"""A real OTLP/gRPC receiver on loopback, built on the official ``opentelemetry-proto`` service
definitions: what the tests and ``bench/otel_overhead.py`` export evaluation events to.

It answers ``LogsService/Export`` and ``TraceService/Export`` as an OpenTelemetry Collector does,
and keeps every log record (``Received``) and span (``Span``) it received, flattened, for
assertions: the sidecar's evaluation events, and the spans of a vLLM that traces
(``--otlp-traces-endpoint``). Needs the ``otel`` extra.
"""

from __future__ import annotations

import threading
import time
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

__all__ = ["OtlpReceiver", "Received", "Span"]


@dataclass(frozen=True)
class Span:
    """One span as the receiver got it (ids as lowercase hex)."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    service: str


@dataclass(frozen=True)
class Received:
    """One log record as the receiver got it (ids as lowercase hex, "" when absent)."""

    event_name: str
    attributes: dict[str, Any]
    trace_id: str
    span_id: str
    severity_text: str
    resource: dict[str, Any]
    scope: str
    schema_url: str


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind) if kind else None


class _Logs(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        out = []
        for rl in request.resource_logs:
            resource = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
            for sl in rl.scope_logs:
                for r in sl.log_records:
                    out.append(
                        Received(
                            event_name=r.event_name,
                            attributes={kv.key: _value(kv.value) for kv in r.attributes},
                            trace_id=r.trace_id.hex(),
                            span_id=r.span_id.hex(),
                            severity_text=r.severity_text,
                            resource=resource,
                            scope=sl.scope.name,
                            schema_url=sl.schema_url or rl.schema_url,
                        )
                    )
        self.sink.add(out)
        return logs_service_pb2.ExportLogsServiceResponse()


class _Traces(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        out = []
        for rs in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in rs.resource.attributes}
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    out.append(
                        Span(
                            name=sp.name,
                            trace_id=sp.trace_id.hex(),
                            span_id=sp.span_id.hex(),
                            parent_span_id=sp.parent_span_id.hex(),
                            attributes={kv.key: _value(kv.value) for kv in sp.attributes},
                            service=str(resource.get("service.name", "")),
                        )
                    )
        self.sink.add_spans(out)
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """``with OtlpReceiver() as rx:`` a receiver on ``rx.endpoint`` (``http://127.0.0.1:<port>``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: list[Received] = []
        self._spans: list[Span] = []
        self.exports = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(_Logs(self), self._server)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Traces(self), self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def add(self, records: list[Received]) -> None:
        with self._lock:
            self._records.extend(records)
            self.exports += 1

    def add_spans(self, spans: list[Span]) -> None:
        with self._lock:
            self._spans.extend(spans)

    @property
    def spans(self) -> list[Span]:
        with self._lock:
            return list(self._spans)

    @property
    def records(self) -> list[Received]:
        with self._lock:
            return list(self._records)

    def wait_for(self, n: int, timeout: float = 20.0) -> list[Received]:
        """The records once at least ``n`` arrived (or whatever came by ``timeout`` s)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.records
            if len(got) >= n:
                return got
            time.sleep(0.05)
        return self.records

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(0)
