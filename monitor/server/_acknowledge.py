"""Acknowledging a scored generation: its audit record is made durable first, then drift counts it
and its evaluation events go out (``otlp_endpoint``), once.

The servicer sends the reply that acknowledges a generation (a Score reply, a stream's final
verdict, an Ingest summary) only after ``generation`` or ``generations`` returns. Drift counts a
generation only once its audit record is durable (or when no audit log is configured), so a reply
that failed with UNAVAILABLE and is retried counts once. A retry of a generation already
acknowledged (the same request id and the same record: an Ingest retried after a later batch
failed, a reply lost on its way) is found in a bounded window of recent generations and is
neither written nor counted again. A HALT is written when it is decided (``halt``), because the
stream that it stops may never send its final chunk.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, TypeVar, cast

from monitor.audit import AuditLog, AuditUnavailable, audit_record, change_point_record, halt_record
from monitor.drift import DriftMonitor
from monitor.errors import InvalidInput
from monitor.pipeline import ScoreResult, StreamVerdict, observe_drift
from monitor.server._ratelog import RateLimitedLog
from monitor.telemetry import OtlpEvents, TraceContext

__all__ = ["WINDOW", "Acknowledger"]

log = logging.getLogger("monitor.server")
R = TypeVar("R", ScoreResult, StreamVerdict)
# Generations remembered for retries (a 16-byte digest each, about 2.5 MiB in all).
WINDOW = 16384
_NOT_IDENTITY = ("time", "rpc")  # fields that differ between a generation and its retry


class Acknowledger:
    """Audit, then drift, once per generation; the event loop owns the window, the executor runs drift."""

    def __init__(
        self,
        audit: AuditLog | None,
        drift: DriftMonitor | None,
        executor: Executor,
        window: int = WINDOW,
        events: OtlpEvents | None = None,
    ) -> None:
        self._audit = audit
        self._drift = drift
        self._events = events
        self._executor = executor
        self._window = window
        self._done: OrderedDict[bytes, None] = OrderedDict()
        self._writing: dict[bytes, asyncio.Future[None]] = {}
        self._failures = RateLimitedLog(log, interval=60.0)

    async def generation(self, rpc: str, result: R, trace: TraceContext | None = None) -> R:
        """Make ``result`` durable, count it in drift and emit its events (with ``trace``); raises
        ``AuditUnavailable`` (do not acknowledge)."""
        (out,) = await self.generations(rpc, [result], [trace])
        return cast(R, out)  # each result comes back as its own type

    async def generations(
        self,
        rpc: str,
        results: Sequence[R | InvalidInput],
        traces: Sequence[TraceContext | None] | None = None,
    ) -> list[R | InvalidInput]:
        """``generation`` for a batch: all written in one group, each durable one counted and its
        events emitted, then the first write error raised. Rejected items (``InvalidInput``) pass
        through untouched; a retry of an acknowledged generation is neither counted nor emitted."""
        writes: list[tuple[int, bytes, asyncio.Future[None] | None]] = []
        for i, result in enumerate(results):
            if isinstance(result, InvalidInput):
                continue
            record = audit_record(rpc, result)
            key = _key(record)
            writes.append((i, key, self._write(key, record)))
        fresh: list[int] = []
        error: AuditUnavailable | None = None
        for i, key, pending in writes:
            if pending is None:  # acknowledged before: neither written nor counted again
                continue
            try:
                await asyncio.shield(pending)  # a cancelled call must not cancel a write others await
            except AuditUnavailable as exc:
                error = error or exc
            else:
                if key not in self._done:
                    self._remember(key)
                    fresh.append(i)
        out = list(results)
        if fresh and self._drift is not None:
            done = [cast(R, out[i]) for i in fresh]
            observed = await asyncio.get_running_loop().run_in_executor(self._executor, _observe, self._drift, done)
            for i, result in zip(fresh, observed, strict=True):
                out[i] = result
                if result.change_points and self._audit is not None:  # noted, not awaited
                    self._audit.write(change_point_record(rpc, result.request_id, result.change_points))
        if self._events is not None:
            for i in fresh:
                self._events.generation(rpc, cast(R, out[i]), traces[i] if traces is not None else None)
        if error is not None:
            raise error
        return out

    async def halt(self, rpc: str, verdict: StreamVerdict) -> bool:
        """Write the record of a HALT just decided; False when it could not be made durable.

        The HALT advice goes out either way: a full disk must not keep the engine generating.
        """
        record = halt_record(rpc, verdict)
        key = _key(record)
        pending = self._write(key, record)
        if pending is None:
            return True
        try:
            await asyncio.shield(pending)
        except AuditUnavailable as exc:
            self._failures.warning((rpc, "halt"), "%s: HALT of %r not audited: %s", rpc, verdict.request_id[:128], exc)
            return False
        self._remember(key)
        return True

    # -- the window of recent generations ------------------------------------------------------
    def _write(self, key: bytes, record: dict[str, Any]) -> asyncio.Future[None] | None:
        """The pending write of ``record``; the one already under way for an identical record; or
        None when it was acknowledged before."""
        if key in self._done:
            self._done.move_to_end(key)
            return None
        if key in self._writing:
            return self._writing[key]
        fut: asyncio.Future[None]
        if self._audit is None:
            fut = asyncio.get_running_loop().create_future()
            fut.set_result(None)
        else:
            fut = asyncio.wrap_future(self._audit.write(record))
        self._writing[key] = fut
        fut.add_done_callback(lambda _: self._writing.pop(key, None))
        return fut

    def _remember(self, key: bytes) -> None:
        self._done[key] = None
        while len(self._done) > self._window:
            self._done.popitem(last=False)


def _key(record: dict[str, Any]) -> bytes:
    """What makes a retry the same generation: every field of its record but the time and the RPC."""
    identity = {k: v for k, v in record.items() if k not in _NOT_IDENTITY}
    return hashlib.blake2b(json.dumps(identity, sort_keys=True, default=str).encode(), digest_size=16).digest()


def _observe(drift: DriftMonitor, results: list[R]) -> list[R]:
    return [observe_drift(drift, r) for r in results]
