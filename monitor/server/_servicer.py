"""The SafetyMonitor servicer: one thin method per RPC, named as in the proto.

Each method converts the wire message, runs the pipeline on the scoring thread pool and
converts the result back. ``_rpc`` is the one place that maps errors to status codes,
sheds load past ``max_in_flight`` and records per-RPC metrics.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager
from typing import TypeVar

import grpc

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.audit import AuditLog
from monitor.critique import CritiqueEvent, CritiqueService
from monitor.errors import InvalidInput
from monitor.metrics import MonitorMetrics
from monitor.pipeline import Pipeline, ScoreInput, ScoreResult
from monitor.server import _convert

log = logging.getLogger("monitor.server")

T = TypeVar("T")
INGEST_BATCH = 64
MAX_INGEST_ERRORS = 20


class SafetyMonitorServicer(pb_grpc.SafetyMonitorServicer):
    """Serves one pipeline; shared state is the in-flight count and the metrics."""

    def __init__(
        self,
        pipeline: Pipeline,
        metrics: MonitorMetrics,
        executor: Executor,
        max_in_flight: int,
        audit: AuditLog | None = None,
        critique: CritiqueService | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._audit = audit
        self._critique = critique
        self._executor = executor
        self._max_in_flight = max_in_flight
        self._active = 0

    # -- RPCs ---------------------------------------------------------------------------------
    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        """Unary: one finished generation."""
        async with self._rpc("Score", context):
            result = await self._run(self._pipeline.score, _convert.score_input(request))
            self._metrics.record_score("Score", result)
            if self._audit is not None:
                self._audit.record("Score", result)
            self._offer(result.request_id, request.prompt, request.output, result.flagged)
            return _convert.score_response(result)

    async def ScoreStream(
        self, request_iterator: AsyncIterator[pb.ScoreChunk], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.Verdict]:
        """Bidirectional: a verdict per chunk of a running generation."""
        async with self._rpc("ScoreStream", context):
            scorer = self._pipeline.open_stream()
            async for chunk in request_iterator:
                verdict = await self._run(scorer.update, _convert.chunk_input(chunk))
                self._metrics.record_chunk(verdict)
                if verdict.final and self._audit is not None:
                    self._audit.record("ScoreStream", verdict)
                if verdict.final:
                    flagged = any(d.fired for d in verdict.detectors)
                    self._offer(verdict.request_id, scorer.prompt, scorer.output, flagged)
                yield _convert.verdict(verdict)

    async def Ingest(
        self, request_iterator: AsyncIterator[pb.ScoreRequest], context: grpc.aio.ServicerContext
    ) -> pb.IngestSummary:
        """Client-streaming: bulk items, scored in batches; the summary follows the last record."""
        async with self._rpc("Ingest", context):
            summary = pb.IngestSummary()
            batch: list[ScoreInput] = []
            async for item in request_iterator:
                batch.append(_convert.score_input(item))
                if len(batch) >= INGEST_BATCH:
                    await self._ingest_batch(batch, summary)
                    batch = []
            if batch:
                await self._ingest_batch(batch, summary)
            return summary

    async def GetDetectors(
        self, request: pb.GetDetectorsRequest, context: grpc.aio.ServicerContext
    ) -> pb.DetectorCatalog:
        """Unary: what the loaded bundle expects."""
        async with self._rpc("GetDetectors", context):
            return _convert.catalog(self._pipeline.bundle, self._pipeline.limits, self._pipeline.detectors)

    # -- helpers ------------------------------------------------------------------------------
    async def _ingest_batch(self, batch: list[ScoreInput], summary: pb.IngestSummary) -> None:
        start_index = summary.received
        outcomes = await self._run(_score_all, self._pipeline, batch)
        for offset, (item, outcome) in enumerate(zip(batch, outcomes, strict=True)):
            summary.received += 1
            if isinstance(outcome, InvalidInput):
                summary.rejected += 1
                self._metrics.ingest_items.labels("rejected").inc()
                self._metrics.record_invalid("Ingest", outcome.reason)
                if len(summary.errors) < MAX_INGEST_ERRORS:
                    summary.errors.add(
                        index=start_index + offset, request_id=item.request_id[:128], message=str(outcome)
                    )
            else:
                summary.accepted += 1
                summary.flagged += int(outcome.flagged)
                self._metrics.ingest_items.labels("accepted").inc()
                self._metrics.record_score("Ingest", outcome)
                if self._audit is not None:
                    self._audit.record("Ingest", outcome)
                self._offer(item.request_id, item.prompt, item.output, outcome.flagged)

    def _offer(self, request_id: str, prompt: str, output: str, flagged: bool) -> None:
        """Hand a finished generation to the critique policy (never blocks; a full queue drops)."""
        if self._critique is not None and output:
            self._critique.offer(CritiqueEvent(request_id, prompt, output, flagged))

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def _rpc(self, rpc: str, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Shed, time, map exceptions to status codes and record the outcome of one RPC."""
        start = time.perf_counter()
        if self._active >= self._max_in_flight:
            self._metrics.shed.labels(rpc).inc()
            self._metrics.record_rpc(rpc, "RESOURCE_EXHAUSTED", time.perf_counter() - start)
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self._active} RPCs in flight (max_in_flight={self._max_in_flight}); retry with backoff",
            )
        self._active += 1
        gauge = self._metrics.in_flight.labels(rpc)
        gauge.inc()
        code = "OK"
        try:
            yield
        except InvalidInput as exc:
            code = "INVALID_ARGUMENT"
            self._metrics.record_invalid(rpc, exc.reason)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        except Exception as exc:  # the server must survive anything a request triggers
            if isinstance(exc, grpc.aio.AbortError):
                code = _code_name(context)
                raise
            code = "INTERNAL"
            log.exception("%s failed", rpc)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        finally:
            self._active -= 1
            gauge.dec()
            self._metrics.record_rpc(rpc, code, time.perf_counter() - start)


def _score_all(pipeline: Pipeline, batch: list[ScoreInput]) -> list[ScoreResult | InvalidInput]:
    out: list[ScoreResult | InvalidInput] = []
    for item in batch:
        try:
            out.append(pipeline.score(item))
        except InvalidInput as exc:
            out.append(exc)
    return out


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
