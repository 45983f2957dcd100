"""Evaluation events out over OTLP/gRPC, built and exported off the scoring path.

The event loop only queues what was concluded (``offer``: a bounded ``queue.Queue``, about a
microsecond); a thread of its own turns it into ``Event`` values and OpenTelemetry log records,
and the SDK's ``BatchLogRecordProcessor`` exports them in batches from its own thread. A full
queue drops the newest work and counts it: a slow or absent collector must never slow scoring or
grow memory. Needs the ``otel`` extra (``pip install 'safety-monitor[otel]'``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from monitor import __version__
from monitor.errors import ConfigError
from monitor.pipeline import ScoreResult, StreamVerdict
from monitor.telemetry._events import SCHEMA_URL, Event, debate_event, evaluation_events, halt_event
from monitor.telemetry._trace import TraceContext

__all__ = ["OtlpEvents", "check_endpoint"]

log = logging.getLogger("monitor.telemetry")

MAX_QUEUE = 4096  # generations (or HALTs, debates) waiting to become events
SDK_QUEUE = 32768  # log records waiting in the SDK's batch processor (it drops the oldest beyond)
EXPORT_TIMEOUT_S = 5.0  # one OTLP export call; a dead collector must not hold shutdown for long
REMEMBERED = 4096  # request id -> trace, for the debate that follows a generation
_STOP = object()


def check_endpoint(endpoint: str) -> tuple[str, bool]:
    """(``host:port``, insecure) of an ``http://`` or ``https://`` OTLP/gRPC endpoint; ConfigError otherwise."""
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.port is None or parts.path not in ("", "/"):
        raise ConfigError(
            f"otlp_endpoint: expected http://HOST:PORT (plain) or https://HOST:PORT (TLS) of an OTLP/gRPC "
            f"receiver, got {endpoint!r}"
        )
    return f"{parts.hostname}:{parts.port}", parts.scheme == "http"


class OtlpEvents:
    """The sidecar's evaluation events, exported to one OTLP/gRPC receiver.

    ``count(outcome, n)`` is told of events ``emitted`` (handed to the SDK's exporter), events
    ``failed`` (in a batch the receiver did not accept) and generations ``dropped`` (this queue was
    full).
    """

    def __init__(
        self,
        endpoint: str,
        *,
        service_name: str = "safety-monitor",
        count: Callable[[str, int], None] = lambda outcome, n: None,
        max_queue: int = MAX_QUEUE,
        schedule_delay_ms: int = 1000,
    ) -> None:
        target, insecure = check_endpoint(endpoint)
        try:
            from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
            from opentelemetry.sdk._logs import LoggerProvider
            from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
            from opentelemetry.sdk.resources import Resource
        except ImportError:
            raise ConfigError(
                "otlp_endpoint: needs the OpenTelemetry SDK and OTLP exporter: pip install 'safety-monitor[otel]'"
            ) from None
        resource = Resource.create({"service.name": service_name, "service.version": __version__})
        self._provider = LoggerProvider(resource=resource)
        exporter = _Counted(OTLPLogExporter(endpoint=target, insecure=insecure, timeout=EXPORT_TIMEOUT_S), count)
        self._provider.add_log_record_processor(
            BatchLogRecordProcessor(
                cast(Any, exporter),  # duck-typed: the SDK is imported only here, not at module level
                schedule_delay_millis=schedule_delay_ms,
                max_queue_size=SDK_QUEUE,
            )
        )
        self._logger = self._provider.get_logger("safety_monitor", __version__, schema_url=SCHEMA_URL)
        self._count = count
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._traces: OrderedDict[str, TraceContext] = OrderedDict()  # event loop only
        self._thread = threading.Thread(target=self._run, name="otel-events", daemon=True)
        self._thread.start()
        self.endpoint = endpoint

    # -- the scoring path (event loop): queue, never block ----------------------------------------
    def generation(self, rpc: str, result: ScoreResult | StreamVerdict, trace: TraceContext | None) -> None:
        """A finished, acknowledged generation: an event per detector that reported."""
        if trace is not None:
            self._traces[result.request_id] = trace
            self._traces.move_to_end(result.request_id)
            while len(self._traces) > REMEMBERED:
                self._traces.popitem(last=False)
        self._offer((evaluation_events, rpc, result, trace))

    def halt(self, rpc: str, verdict: StreamVerdict, trace: TraceContext | None) -> None:
        """A HALT just decided."""
        self._offer((_one, halt_event, rpc, verdict, trace))

    def record(self, record: Mapping[str, Any]) -> None:
        """A background result (``monitor.debate``'s record); other records are not events."""
        if record.get("type") == "debate":
            trace = self._traces.get(str(record.get("request_id", "")))
            self._offer((_debate, record, trace))

    def _offer(self, work: tuple[Any, ...]) -> None:
        try:
            self._queue.put_nowait(work)
        except queue.Full:
            self._count("dropped", 1)

    # -- the exporter thread ----------------------------------------------------------------------
    def _run(self) -> None:
        from opentelemetry._logs import LogRecord, SeverityNumber
        from opentelemetry.trace import TraceFlags

        severity = {"INFO": SeverityNumber.INFO, "WARN": SeverityNumber.WARN}
        while True:
            work = self._queue.get()
            if work is _STOP:
                return
            try:
                build, *args = work
                events: list[Event] = build(*args)
                now = time.time_ns()
                for e in events:
                    ids: dict[str, Any] = {}
                    if e.trace is not None:
                        ids = {
                            "trace_id": int(e.trace.trace_id, 16),
                            "span_id": int(e.trace.span_id, 16),
                            "trace_flags": TraceFlags(e.trace.flags & 0xFF),
                        }
                    self._logger.emit(
                        LogRecord(
                            timestamp=now,
                            observed_timestamp=now,
                            severity_number=severity[e.severity],
                            severity_text=e.severity,
                            attributes=e.attributes,
                            event_name=e.name,
                            **ids,
                        )
                    )
                self._count("emitted", len(events))
            except Exception:  # one bad event must not end the thread (and with it every later event)
                log.exception("otel: could not build an evaluation event; skipped")

    def close(self, timeout: float = 5.0) -> None:
        """Export what is queued, then stop the thread and the SDK, all within ``timeout`` s: the
        SDK's flush does not bound itself while an export retries, so it runs on a daemon thread
        that is left behind (logged) when a dead collector would hold the shutdown longer."""
        deadline = time.monotonic() + timeout
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=max(0.0, deadline - time.monotonic()))
        self._thread.join(max(0.0, deadline - time.monotonic()))

        def flush() -> None:
            self._provider.force_flush(int(max(0.0, deadline - time.monotonic()) * 1000))
            self._provider.shutdown()

        closer = threading.Thread(target=flush, name="otel-flush", daemon=True)
        closer.start()
        closer.join(max(0.0, deadline - time.monotonic()))
        if closer.is_alive():
            log.warning("otel: events not all exported to %s within %.0f s at shutdown", self.endpoint, timeout)


class _Counted:
    """The OTLP exporter, counting the events of every batch the receiver did not accept."""

    def __init__(self, inner: Any, count: Callable[[str, int], None]) -> None:
        self._inner = inner
        self._count = count

    def export(self, batch: Any) -> Any:
        result = self._inner.export(batch)
        if getattr(result, "name", "") != "SUCCESS":  # the SDK has two such enums (one deprecated)
            self._count("failed", len(batch))
        return result

    def __getattr__(self, name: str) -> Any:  # shutdown, force_flush, ...
        return getattr(self._inner, name)


def _one(build: Callable[..., Event], *args: Any) -> list[Event]:
    return [build(*args)]


def _debate(record: Mapping[str, Any], trace: TraceContext | None) -> list[Event]:
    event = debate_event(record, trace)
    return [event] if event is not None else []
