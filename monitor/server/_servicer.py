"""The SafetyMonitor servicer: one thin method per RPC, named as in the proto.

Each method hands the raw request bytes to the scoring thread pool, which bounds their declared
work, parses, converts and scores them (never the event loop, which must keep answering health
checks), and converts the result back. Every RPC is registered request-streaming, so a call is
admitted, and its body timed, from its first byte. ``_rpc`` is the one place that admits or sheds a call, maps errors to
status codes and records per-RPC metrics. Unary calls and streams draw on separate admission
budgets, so idle or abandoned streams can never starve ``Score``. A reply that acknowledges a
generation is sent only after its audit record is durable (``monitor.audit``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from grpc._cython.cygrpc import ExecuteBatchError

from monitor._proto import monitor_pb2 as pb
from monitor.audit import AuditLog, AuditUnavailable
from monitor.critique import CritiqueEvent, CritiqueService
from monitor.debate import DebateEvent, DebateService
from monitor.detectors import DetectorResult
from monitor.drift import DriftMonitor
from monitor.errors import InvalidInput
from monitor.metrics import MonitorMetrics
from monitor.pipeline import Pipeline, ScoreInput, ScoreResult, StreamScorer, StreamVerdict
from monitor.server import _convert
from monitor.server._acknowledge import Acknowledger
from monitor.server._budget import Budget
from monitor.server._decode import decode
from monitor.server._ratelog import RateLimitedLog
from monitor.telemetry import OtlpEvents, TraceContext, parse_traceparent, trace_from_metadata

log = logging.getLogger("monitor.server")

T = TypeVar("T")
INGEST_BATCH = 64
MAX_INGEST_ERRORS = 20
SERVICE = "safety_monitor.v1.SafetyMonitor"
STREAMING_RPCS = frozenset({"ScoreStream", "Ingest"})
# The client's deadline fires on its side a few ms before the server's clock says it passed.
DEADLINE_SLACK = 0.05


@dataclass(frozen=True)
class Admission:
    """How many calls run at once, and how long a stream may stay silent or how many items it may send.

    Unary calls (Score, GetDetectors) and streams (ScoreStream, Ingest) have separate budgets.
    """

    max_in_flight: int = 64
    max_streams: int = 1024
    stream_idle_seconds: float = 30.0
    max_stream_chunks: int = 16384
    send_timeout_seconds: float = 10.0


@dataclass
class _Call:
    """What ``_rpc`` knows of a call: its trace context (``traceparent`` metadata) and how it ended
    (a stream without its final chunk)."""

    trace: TraceContext | None = None
    incomplete: bool = False


class _Refused(Exception):
    """A call or stream the server ends on purpose with a status other than INVALID_ARGUMENT."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class _ClientGone(Exception):
    """A reply could not be written: the client cancelled or its connection dropped."""


class _SendTimeout(Exception):
    """The client read no reply for ``send_timeout_seconds``.

    No status can be sent either: gRPC queues it behind the blocked message, and ``abort`` then
    waits as long as the client does. The call is ended like a cancelled one instead.
    """


class SafetyMonitorServicer:
    """Serves one pipeline; shared state is the in-flight counts and the metrics."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: MonitorMetrics,
        executor: Executor,
        admission: Admission,
        audit: AuditLog | None = None,
        critique: CritiqueService | None = None,
        debate: DebateService | None = None,
        drift: DriftMonitor | None = None,
        events: OtlpEvents | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._events = events
        self._acks = Acknowledger(audit, drift, executor, events=events)
        self._metrics = metrics
        self._critique = critique
        self._debate = debate
        self._executor = executor
        self._admission = admission
        self._active = {"unary": 0, "stream": 0}
        self._rejections = RateLimitedLog(log, interval=60.0)
        self._budget = Budget(max_blocks=max(64, len(pipeline.bundle.hook_points)))

    # -- RPCs ---------------------------------------------------------------------------------
    async def Score(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.ScoreResponse:
        """Unary: one finished generation."""
        async with self._rpc("Score", context) as call:
            raw = await self._one(request_iterator, "Score")
            item, result, traceparent = await self._run(self._score_bytes, raw)
            call.trace = trace = self._trace(traceparent, call.trace)  # the RPC's latency exemplar too
            result = await self._acks.generation("Score", result, trace)
            self._metrics.record_score("Score", result, trace)
            self._offer(result.request_id, item.prompt, item.output, result.flagged, result.detectors)
            return _convert.score_response(result)

    async def ScoreStream(self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> None:
        """Bidirectional: a verdict per chunk of a running generation.

        Written with ``context.write`` rather than ``yield`` so that each send has a deadline: a
        client that stops reading blocks the send (HTTP/2 flow control), and a generator would hold
        its stream slot for as long as the client liked.
        """
        async with self._rpc("ScoreStream", context) as call:
            # Headers go out on their own (they are not flow-controlled), so a send that times out
            # leaves only its message pending and the status can still be queued behind it.
            await self._transport(context.send_initial_metadata(()))
            scorer = self._pipeline.open_stream()
            trace: TraceContext | None = None
            traced = False  # a chunk's traceparent field was read (the first one that has it)
            async for raw in self._items(request_iterator, "ScoreStream"):
                traceparent, verdict = await self._run(self._update_bytes, scorer, raw)
                if traceparent and not traced:
                    traced, trace = True, self._trace(traceparent, None)
                call.trace = trace = trace or call.trace  # the RPC's latency exemplar too
                if verdict.halted_now:
                    await self._acks.halt("ScoreStream", verdict)
                    if self._events is not None:
                        self._events.halt("ScoreStream", verdict, trace)
                if verdict.final:
                    verdict = await self._acks.generation("ScoreStream", verdict, trace)
                self._metrics.record_chunk(verdict, trace)
                if verdict.final:
                    flagged = any(d.fired for d in verdict.detectors)
                    self._offer(verdict.request_id, scorer.prompt, scorer.output, flagged, verdict.detectors)
                call.incomplete = not scorer.finished and scorer.chunks > 0
                await self._send(context, _convert.verdict(verdict), "ScoreStream")

    async def Ingest(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.IngestSummary:
        """Client-streaming: bulk items, scored in batches; the summary follows the last durable record."""
        async with self._rpc("Ingest", context) as call:
            summary = pb.IngestSummary()
            batch: list[bytes] = []
            async for raw in self._items(request_iterator, "Ingest"):
                batch.append(raw)
                if len(batch) >= INGEST_BATCH:
                    await self._ingest_batch(batch, summary, call.trace)
                    batch = []
            if batch:
                await self._ingest_batch(batch, summary, call.trace)
            return summary

    async def GetDetectors(
        self, request_iterator: AsyncIterator[bytes], context: grpc.aio.ServicerContext
    ) -> pb.DetectorCatalog:
        """Unary: what the loaded bundle expects."""
        async with self._rpc("GetDetectors", context):
            raw = await self._one(request_iterator, "GetDetectors")
            await self._run(decode, pb.GetDetectorsRequest, raw, self._budget)
            return _convert.catalog(self._pipeline.bundle, self._pipeline.limits, self._pipeline.detectors)

    # -- helpers ------------------------------------------------------------------------------
    async def _items(self, iterator: AsyncIterator[T], rpc: str) -> AsyncIterator[T]:
        """The stream's items, ended with a status when the client goes silent or sends too many."""
        adm = self._admission
        it = iterator.__aiter__()
        count = 0
        while True:
            try:
                item = await asyncio.wait_for(it.__anext__(), adm.stream_idle_seconds)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self._metrics.receive_timeouts.labels(rpc).inc()
                raise _Refused(
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    f"{rpc}: no complete message for {adm.stream_idle_seconds:g} s (stream_idle_seconds); call closed",
                    "idle",
                ) from None
            count += 1
            if count > adm.max_stream_chunks:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{rpc}: more than {adm.max_stream_chunks} messages in one stream (max_stream_chunks)",
                    "too_many_chunks",
                )
            yield item

    async def _one(self, iterator: AsyncIterator[bytes], rpc: str) -> bytes:
        """The one request of a unary call, read under the same clock as a stream's messages."""
        async for raw in self._items(iterator, rpc):
            return raw
        raise InvalidInput("request", f"one {rpc} request message", "none (the client closed first)", reason="missing")

    async def _send(self, context: grpc.aio.ServicerContext, message: object, rpc: str) -> None:
        """Write one reply, or end the call when the client has read nothing for ``send_timeout_seconds``."""
        timeout = self._admission.send_timeout_seconds
        try:
            await self._transport(asyncio.wait_for(context.write(message), timeout))
        except TimeoutError:
            self._metrics.send_timeouts.labels(rpc).inc()
            raise _SendTimeout(
                f"{rpc}: the client read no reply for {timeout:g} s (send_timeout_seconds); stream closed"
            ) from None

    @staticmethod
    async def _transport(op: Awaitable[None]) -> None:
        """Await a send; a send the transport refuses means nobody is there to read it."""
        try:
            await op
        except ExecuteBatchError as exc:
            raise _ClientGone(str(exc)) from None

    async def _ingest_batch(
        self, batch: list[bytes], summary: pb.IngestSummary, call_trace: TraceContext | None
    ) -> None:
        start_index = summary.received
        scored = await self._run(self._score_all, batch)
        # the summary acknowledges these: on disk (and counted in drift) first
        traces = [self._trace(traceparent, call_trace) for _, _, _, traceparent in scored]
        outcomes = await self._acks.generations("Ingest", [outcome for _, _, outcome, _ in scored], traces)
        for offset, ((request_id, item, _, _), outcome, trace) in enumerate(zip(scored, outcomes, traces, strict=True)):
            summary.received += 1
            if isinstance(outcome, InvalidInput):
                summary.rejected += 1
                self._metrics.ingest_items.labels("rejected").inc()
                self._metrics.record_invalid("Ingest", outcome.reason)
                self._rejections.warning(("Ingest", outcome.reason), "Ingest item rejected: %s", outcome)
                if len(summary.errors) < MAX_INGEST_ERRORS:
                    summary.errors.add(index=start_index + offset, request_id=request_id, message=str(outcome))
            else:
                summary.accepted += 1
                summary.flagged += int(outcome.flagged)
                self._metrics.ingest_items.labels("accepted").inc()
                self._metrics.record_score("Ingest", outcome, trace)
                assert item is not None
                self._offer(item.request_id, item.prompt, item.output, outcome.flagged, outcome.detectors)

    # The *_bytes methods run on the scoring pool: decoding a body costs what it declares, and the
    # budget bounds that, but it must never stall the event loop (health checks, other calls).
    # Drift is recorded by the Acknowledger, once the audit record is on disk.
    def _score_bytes(self, raw: bytes) -> tuple[ScoreInput, ScoreResult, str]:
        req = decode(pb.ScoreRequest, raw, self._budget)
        item = _convert.score_input(req)
        return item, self._pipeline.score(item), req.traceparent

    def _update_bytes(self, scorer: StreamScorer, raw: bytes) -> tuple[str, StreamVerdict]:
        chunk = decode(pb.ScoreChunk, raw, self._budget)
        return chunk.traceparent, scorer.update(_convert.chunk_input(chunk))

    def _score_all(self, batch: list[bytes]) -> list[tuple[str, ScoreInput | None, ScoreResult | InvalidInput, str]]:
        """(request id, input, result or rejection, traceparent) per Ingest item; a bad item is rejected alone."""
        out: list[tuple[str, ScoreInput | None, ScoreResult | InvalidInput, str]] = []
        for raw in batch:
            request_id, item, traceparent = "", None, ""
            try:
                req = decode(pb.ScoreRequest, raw, self._budget)
                request_id, traceparent = req.request_id[:128], req.traceparent
                item = _convert.score_input(req)
                out.append((request_id, item, self._pipeline.score(item), traceparent))
            except InvalidInput as exc:
                out.append((request_id, item, exc, traceparent))
        return out

    def _trace(self, traceparent: str, call_trace: TraceContext | None) -> TraceContext | None:
        """A generation's trace: its own ``traceparent`` field, else the call's metadata. A malformed
        field is ignored (the generation is scored all the same), counted and logged."""
        if not traceparent:
            return call_trace
        trace = parse_traceparent(traceparent)
        if trace is None:
            self._metrics.trace_context_invalid.labels("field").inc()
            self._rejections.warning(
                ("trace", "field"),
                "traceparent: expected a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>), got %r; ignored",
                traceparent[:80],
            )
            return call_trace
        return trace

    def _offer(
        self, request_id: str, prompt: str, output: str, flagged: bool, detectors: tuple[DetectorResult, ...] = ()
    ) -> None:
        """Hand a finished generation to the critique policy and, if a critical detector fired, to the
        debate queue (neither blocks; a full queue drops)."""
        if self._critique is not None and output:
            self._critique.offer(CritiqueEvent(request_id, prompt, output, flagged))
        if self._debate is not None and output:
            self._debate.offer(DebateEvent.from_detectors(request_id, prompt, output, detectors))

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def _rpc(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[_Call]:
        """Admit or shed, time, map exceptions to status codes and record the outcome of one RPC."""
        start = time.perf_counter()
        pool = "stream" if rpc in STREAMING_RPCS else "unary"
        limit = self._admission.max_streams if pool == "stream" else self._admission.max_in_flight
        if self._active[pool] >= limit:
            self._metrics.shed.labels(rpc).inc()
            self._metrics.record_rpc(rpc, "RESOURCE_EXHAUSTED", time.perf_counter() - start)
            setting = "max_streams" if pool == "stream" else "max_in_flight"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._active[pool]} {pool} RPCs in flight ({setting}={limit}); retry with backoff",
            )
        self._active[pool] += 1
        gauge = self._metrics.in_flight.labels(rpc)
        gauge.inc()
        code = "OK"
        trace, malformed = trace_from_metadata(context.invocation_metadata())
        if malformed:
            self._metrics.trace_context_invalid.labels("metadata").inc()
            self._rejections.warning(("trace", "metadata"), "%s: malformed traceparent metadata ignored", rpc)
        call = _Call(trace=trace)
        try:
            yield call
        except InvalidInput as exc:
            code = "INVALID_ARGUMENT"
            self._metrics.record_invalid(rpc, exc.reason)
            self._rejections.warning((rpc, exc.reason), "%s rejected: %s", rpc, exc)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except _Refused as exc:
            code = exc.code.name
            self._rejections.warning((rpc, exc.reason), "%s", exc)
            await context.abort(exc.code, str(exc))
        except AuditUnavailable as exc:
            code = "UNAVAILABLE"
            self._rejections.warning((rpc, "audit"), "%s not acknowledged: %s", rpc, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"{exc}; the generation was not recorded, retry")
        except (asyncio.CancelledError, GeneratorExit):
            code = _ended_code(context, "CANCELLED")
            raise
        except _ClientGone:
            # No status can reach the client either: end the call the way gRPC ends a cancelled
            # one (CancelledError is logged at debug level), never with a traceback per stream.
            code = _ended_code(context, "CANCELLED")
            raise asyncio.CancelledError() from None
        except _SendTimeout as exc:
            code = "DEADLINE_EXCEEDED"
            self._rejections.warning((rpc, "send_timeout"), "%s", exc)
            raise asyncio.CancelledError() from None
        except Exception as exc:  # the server must survive anything a request triggers
            if isinstance(exc, grpc.aio.AbortError):
                code = _code_name(context)
                raise
            code = "INTERNAL"
            log.exception("%s failed", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._active[pool] -= 1
            gauge.dec()
            if code == "OK":
                # A client that cancels (or half-closes) a stream before its final chunk ends the
                # request iterator like a finished stream: that generation was not fully scored.
                code = _ended_code(context, "CANCELLED" if call.incomplete else "OK")
            self._metrics.record_rpc(rpc, code, time.perf_counter() - start, call.trace)


def _ended_code(context: grpc.aio.ServicerContext, default: str) -> str:
    """CANCELLED or DEADLINE_EXCEEDED when the client went away, else ``default``."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= DEADLINE_SLACK:
        return "DEADLINE_EXCEEDED"
    if context.cancelled():
        return "CANCELLED"
    return default


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def add_to_server(servicer: SafetyMonitorServicer, server: grpc.aio.Server) -> None:
    """Register the RPCs.

    Requests arrive as raw bytes (no deserializer: gRPC would run it on the event loop), and every
    RPC is request-streaming, even the unary ones: gRPC then starts the handler at the call's first
    byte, so admission applies before the body is buffered and an unfinished body times out
    (``stream_idle_seconds``). On the wire a unary client cannot tell the difference.
    """
    table: dict[str, tuple[Callable[..., Any], Any, Any]] = {
        "Score": (grpc.stream_unary_rpc_method_handler, servicer.Score, pb.ScoreResponse),
        "ScoreStream": (grpc.stream_stream_rpc_method_handler, servicer.ScoreStream, pb.Verdict),
        "Ingest": (grpc.stream_unary_rpc_method_handler, servicer.Ingest, pb.IngestSummary),
        "GetDetectors": (grpc.stream_unary_rpc_method_handler, servicer.GetDetectors, pb.DetectorCatalog),
    }
    handlers = {
        name: kind(method, request_deserializer=None, response_serializer=response.SerializeToString)
        for name, (kind, method, response) in table.items()
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)
