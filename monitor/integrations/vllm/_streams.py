"""One ScoreStream per running request, fed from the engine thread without ever blocking it.

The engine's step loop calls ``push()`` once per step with every request's new rows. That call
only takes a lock, counts, and hands the batch to a background asyncio thread; the network, the
verdicts and the tokenizer all live on that thread. Rows beyond ``max_queued_rows`` (the sidecar
is slow or down) are dropped and counted, never waited for. HALT advice is reported through the
``on_halt`` callback, once per request, from the background thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from monitor.client import AsyncMonitorClient, Catalog, ChunkVerdict, ClientError

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs

Decode = Callable[[Sequence[int]], str]


@dataclass
class StreamStats:
    """Counters of what the adapter delivered and what it had to give up (read with ``stats``)."""

    requests: int = 0  # streams opened
    finished: int = 0  # streams that got their final verdict
    failed: int = 0  # requests left unmonitored: the sidecar could not take them, or no row reached it
    rows_sent: int = 0
    rows_dropped: int = 0  # over max_queued_rows, or for a failed stream
    chunks: int = 0
    halts: int = 0


@dataclass
class _Item:
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    final: bool = False
    token_ids: Sequence[int] = ()
    decision: dict[str, np.ndarray] = field(default_factory=dict)  # [1, width] per hook point


@dataclass
class _Request:
    request_id: str  # the key (the engine's id: unique per request)
    wire_id: str  # what the sidecar records (the client's id, which two requests may share)
    prompt_ids: Sequence[int]
    labels: dict[str, str]
    queue: asyncio.Queue[_Item]
    task: asyncio.Task[None] | None = None
    last: ChunkVerdict | None = None
    halted: bool = False


class SidecarStreams:
    """Per-request ``ScoreStream`` calls to one sidecar, on a background thread.

    ``push`` / ``finish`` / ``open`` are cheap and never block; ``verdict`` and ``catalog`` wait.
    ``decode`` turns token ids into text (prompt and output) off the engine thread.
    """

    def __init__(
        self,
        target: str,
        *,
        model: str = "",
        token: str | None = None,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
        projected: bool = False,
        max_queued_rows: int = 65536,
        chunk_tokens: int = 16,
        max_delay: float = 0.5,
        on_halt: Callable[[str, str], None] | None = None,
        decode: Decode | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        if max_queued_rows < 1:
            raise ValueError(f"max_queued_rows: expected >= 1, got {max_queued_rows}")
        if chunk_tokens < 1 or max_delay < 0:
            raise ValueError(f"chunk_tokens / max_delay: expected >= 1 / >= 0, got {chunk_tokens} / {max_delay}")
        self.chunk_tokens = chunk_tokens
        self.max_delay = max_delay
        self.target = target
        self.model = model
        self.projected = projected
        self.max_queued_rows = max_queued_rows
        self._on_halt = on_halt
        self._decode = decode
        self._labels = dict(labels or {})
        self._token = token
        self._tls = (tls_ca, tls_cert, tls_key)
        self._lock = threading.Lock()
        self._queued_rows = 0
        self._stats = StreamStats()
        self._requests: dict[str, _Request] = {}
        self._done: dict[str, ChunkVerdict | None] = {}
        self._done_cv = threading.Condition(self._lock)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safety-monitor-streams", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- engine thread ------------------------------------------------------------------------
    def open(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        labels: Mapping[str, str] | None = None,
        wire_id: str | None = None,
    ) -> None:
        """Start monitoring a request (the stream opens lazily with its first rows).

        ``request_id`` keys every later call (``push``, ``finish``, ``on_halt``); ``wire_id`` (default:
        the same) is the id the sidecar's verdict and audit record carry."""
        with self._lock:
            self._stats.requests += 1
        self._loop.call_soon_threadsafe(
            self._open, request_id, wire_id or request_id, list(prompt_ids), dict(labels or {})
        )

    def push(
        self,
        batch: Mapping[str, Mapping[str, np.ndarray]],
        decisions: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        """New rows per request: ``{request_id: {hook_point: [rows, width]}}``, and a request's
        decision row (``[1, width]`` per hook point at the last prompt token) once, in
        ``decisions``. Never blocks; rows over ``max_queued_rows`` are dropped and counted (a
        decision row is one per request and always kept)."""
        kept: dict[str, dict[str, np.ndarray]] = {}
        with self._lock:
            for rid, rows in batch.items():
                n = max((len(a) for a in rows.values()), default=0)
                if self._queued_rows + n > self.max_queued_rows:
                    self._stats.rows_dropped += n
                    continue
                self._queued_rows += n
                kept[rid] = dict(rows)
        dec = {rid: dict(d) for rid, d in (decisions or {}).items()}
        if kept or dec:
            self._loop.call_soon_threadsafe(self._dispatch, kept, dec)

    def finish(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The request is over; ``token_ids`` are its output tokens (for the output text)."""
        self._loop.call_soon_threadsafe(self._finish, request_id, list(token_ids))

    @property
    def stats(self) -> StreamStats:
        with self._lock:
            return StreamStats(**vars(self._stats))

    # -- callers that may wait ----------------------------------------------------------------
    def catalog(self, timeout: float = 10.0) -> Catalog:
        """The sidecar's catalog (model, hook points, encoder slices); raises ``ClientError``."""
        fut = asyncio.run_coroutine_threadsafe(self._client.get_detectors(), self._loop)
        return fut.result(timeout)

    def verdict(self, request_id: str, timeout: float = 30.0) -> ChunkVerdict | None:
        """The final verdict of a finished request (None when its stream failed or on timeout)."""
        deadline = time.monotonic() + timeout
        with self._done_cv:
            while request_id not in self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._done_cv.wait(left)
            return self._done[request_id]

    def close(self, timeout: float = 10.0) -> None:
        """Let running streams finish (up to ``timeout``), then stop the thread."""
        fut = asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop)
        try:
            fut.result(timeout + 5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # -- background thread ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = AsyncMonitorClient(
            self.target, token=self._token, tls_ca=self._tls[0], tls_cert=self._tls[1], tls_key=self._tls[2]
        )
        self._ready.set()
        self._loop.run_forever()

    def _open(self, request_id: str, wire_id: str, prompt_ids: list[int], labels: dict[str, str]) -> None:
        req = _Request(request_id, wire_id, prompt_ids, {**self._labels, **labels}, asyncio.Queue())
        self._requests[request_id] = req
        req.task = self._loop.create_task(self._serve(req))

    def _dispatch(self, batch: dict[str, dict[str, np.ndarray]], decisions: dict[str, dict[str, np.ndarray]]) -> None:
        for rid in sorted(set(batch) | set(decisions), key=lambda r: r not in decisions):
            rows = batch.get(rid, {})
            req = self._requests.get(rid)
            if req is None:  # never opened (or already finished): nothing to attribute them to
                self._release(rows, dropped=True)
                continue
            req.queue.put_nowait(_Item(rows, decision=decisions.get(rid, {})))

    def _finish(self, request_id: str, token_ids: list[int]) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.queue.put_nowait(_Item(final=True, token_ids=token_ids))

    def _release(self, rows: Mapping[str, np.ndarray], *, dropped: bool) -> None:
        n = max((len(a) for a in rows.values()), default=0)
        with self._lock:
            self._queued_rows -= n
            if dropped:
                self._stats.rows_dropped += n
            else:
                self._stats.rows_sent += n

    def _text(self, ids: Sequence[int]) -> str:
        if self._decode is None or not ids:
            return ""
        try:
            return self._decode(ids)
        except Exception:  # a tokenizer error must not cost the verdict
            log.exception("safety monitor: could not decode %d token ids", len(ids))
            return ""

    async def _collect(self, req: _Request) -> list[_Item]:
        """Wait for the next chunk: ``chunk_tokens`` rows, the final item, or ``max_delay`` after the
        first row, whichever comes first (fewer, larger chunks: less sidecar and network work per
        token; HALT advice is at most one chunk late)."""
        items = [await req.queue.get()]
        n = max((len(a) for a in items[0].rows.values()), default=0)
        deadline = self._loop.time() + self.max_delay
        while n < self.chunk_tokens and not items[-1].final:
            if req.queue.empty():
                left = deadline - self._loop.time()
                if left <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(req.queue.get(), left))
                except TimeoutError:
                    break
            else:
                items.append(req.queue.get_nowait())
            n += max((len(a) for a in items[-1].rows.values()), default=0)
        return items

    async def _serve(self, req: _Request) -> None:
        """Send this request's chunks as they come."""
        stream = None
        failed = False
        try:
            while True:
                items = await self._collect(req)
                rows: dict[str, list[np.ndarray]] = {}
                final = None
                decision = next((it.decision for it in items if it.decision), None)
                for it in items:
                    for hp, a in it.rows.items():
                        rows.setdefault(hp, []).append(a)
                    if it.final:
                        final = it
                merged = {hp: np.concatenate(parts) if len(parts) > 1 else parts[0] for hp, parts in rows.items()}
                if not failed and stream is None and not merged and decision is None and final is not None:
                    # every row of this request was dropped (or it had none): nothing to score,
                    # and the sidecar refuses a stream without activations; it is unmonitored
                    failed = True
                    with self._lock:
                        self._stats.failed += 1
                    log.warning(
                        "safety monitor: request %s is unmonitored: no activation rows reached it", req.request_id
                    )
                elif failed:
                    self._release(merged, dropped=True)
                else:
                    try:
                        if stream is None:
                            stream = self._client.stream(
                                req.wire_id, self.model, prompt=self._text(req.prompt_ids), labels=req.labels
                            )
                        text = self._text(final.token_ids) if final is not None else ""
                        verdict = await stream.send(
                            merged or None,
                            text,
                            final=final is not None,
                            projected=self.projected,
                            decision=decision,
                        )
                    except ClientError as exc:
                        failed = True
                        self._release(merged, dropped=True)
                        with self._lock:
                            self._stats.failed += 1
                        log.warning("safety monitor: request %s is unmonitored: %s", req.request_id, exc)
                    else:
                        self._release(merged, dropped=False)
                        req.last = verdict
                        with self._lock:
                            self._stats.chunks += 1
                        if verdict.halt and not req.halted:
                            req.halted = True
                            with self._lock:
                                self._stats.halts += 1
                            if self._on_halt is not None:
                                self._on_halt(req.request_id, verdict.reason)
                if final is not None:
                    break
        finally:
            self._requests.pop(req.request_id, None)
            with self._done_cv:
                if not failed:
                    self._stats.finished += 1
                self._done[req.request_id] = None if failed else req.last
                if len(self._done) > 4096:  # bounded: keep the most recent verdicts
                    for key in list(self._done)[:1024]:
                        del self._done[key]
                self._done_cv.notify_all()

    async def _drain(self, timeout: float) -> None:
        tasks = [r.task for r in self._requests.values() if r.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
        await self._client.close()
