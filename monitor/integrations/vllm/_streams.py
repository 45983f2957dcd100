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
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitor.client import AsyncMonitorClient, AsyncScoreStream, Catalog, ChunkVerdict, ClientError

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs

Decode = Callable[[Sequence[int]], str]


# Why a request ends unmonitored (``StreamStats.unmonitored`` keys; exported as a label).
UNMONITORED_REASONS = (
    "sidecar_unavailable",  # not reachable (down, restarting, or its catalog not fetched yet)
    "stream_refused",  # RESOURCE_EXHAUSTED: the sidecar shed the stream (its max_streams)
    "send_deadline",  # no verdict within send_timeout: a stalled sidecar
    "stream_error",  # any other error the sidecar or the call reported
    "no_rows",  # no activation row of the request reached the stream (all dropped, or none)
    "adapter_error",  # a bug on this side (an exception that is not a ClientError)
    "monitoring_off",  # the catalog was rejected by the engine side (e.g. another model's bundle)
    "shutdown",  # still running when the adapter closed
)
# Why rows were dropped (``StreamStats.dropped`` keys).
DROP_REASONS = (
    "queue_full",  # over max_queued_rows: the sidecar is slow or down
    "stream_failed",  # rows of a request that is unmonitored (whatever its reason)
    "not_open",  # rows of a request never opened or already finished
)


@dataclass(frozen=True)
class StreamStats:
    """One consistent snapshot of what the adapter delivered and what it gave up (``stats``).

    Every opened request ends either ``finished`` (its final verdict came) or unmonitored
    (``failed``, split by reason in ``unmonitored``); ``rows_dropped`` is split in ``dropped``.
    """

    requests: int = 0  # requests opened
    finished: int = 0  # streams that got their final verdict
    failed: int = 0  # requests left unmonitored: the sum of ``unmonitored``
    rows_sent: int = 0
    rows_dropped: int = 0  # the sum of ``dropped``
    chunks: int = 0
    halts: int = 0
    unmonitored: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(UNMONITORED_REASONS, 0))
    dropped: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))


@dataclass(frozen=True)
class LiveState:
    """What a ``SidecarStreams`` holds right now (``live()``): all zero once every request is over."""

    requests: int  # opened and not yet finished (monitored or not)
    tasks: int  # asyncio tasks still running (one per monitored request, plus a catalog fetch)
    queued_rows: int  # rows handed over by ``push`` and not yet sent or dropped
    verdicts: int  # final verdicts kept for ``verdict()`` (bounded)


class _Counters:
    """The mutable counters behind ``StreamStats``; guarded by ``SidecarStreams._lock``."""

    def __init__(self) -> None:
        self.requests = self.finished = self.rows_sent = self.chunks = self.halts = 0
        self.unmonitored = dict.fromkeys(UNMONITORED_REASONS, 0)
        self.dropped = dict.fromkeys(DROP_REASONS, 0)

    def snapshot(self) -> StreamStats:
        return StreamStats(
            requests=self.requests,
            finished=self.finished,
            failed=sum(self.unmonitored.values()),
            rows_sent=self.rows_sent,
            rows_dropped=sum(self.dropped.values()),
            chunks=self.chunks,
            halts=self.halts,
            unmonitored=dict(self.unmonitored),
            dropped=dict(self.dropped),
        )


class _RateLimited:
    """Log a warning per key at most every ``every`` s, with the count suppressed meanwhile."""

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._next: dict[str, float] = {}
        self._quiet: dict[str, int] = {}

    def warning(self, key: str, msg: str, *args: object, exc_info: BaseException | None = None) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._quiet[key] = self._quiet.get(key, 0) + 1
            return
        self._next[key] = now + self.every
        quiet = self._quiet.pop(key, 0)
        suffix = f" ({quiet} more like it not logged)" if quiet else ""
        log.warning(msg + suffix, *args, exc_info=exc_info)


def _rows(rows: Mapping[str, np.ndarray]) -> int:
    return max((len(a) for a in rows.values()), default=0)


def _reason(exc: BaseException) -> str:
    """The unmonitored reason for an exception raised while serving a request."""
    if not isinstance(exc, ClientError):
        return "adapter_error"
    return {
        "UNAVAILABLE": "sidecar_unavailable",
        "RESOURCE_EXHAUSTED": "stream_refused",
        "DEADLINE_EXCEEDED": "send_deadline",
    }.get(exc.code, "stream_error")


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
    traceparent: str = ""
    task: asyncio.Task[None] | None = None
    last: ChunkVerdict | None = None
    halted: bool = False
    reason: str | None = None  # set once the request is unmonitored
    taken: list[_Item] = field(default_factory=list)  # items out of the queue, not yet sent or dropped


class SidecarStreams:
    """Per-request ``ScoreStream`` calls to one sidecar, on a background thread.

    ``push`` / ``finish`` / ``open`` are cheap and never block; ``verdict`` and ``catalog`` wait.
    ``decode`` turns token ids into text (prompt and output) off the engine thread. Whatever goes
    wrong with one request (the sidecar, the network, a bug here) makes that request unmonitored,
    counted by reason, with its rows released: never the engine's problem, never a leak.
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
        send_timeout: float = 5.0,
        open_timeout: float = 2.0,
        reconnect_backoff: float = 0.5,
        on_halt: Callable[[str, str], None] | None = None,
        on_progress: Callable[[str, int, bool], None] | None = None,
        decode: Decode | None = None,
        labels: Mapping[str, str] | None = None,
        keep_verdicts: int = 0,
    ) -> None:
        if max_queued_rows < 1:
            raise ValueError(f"max_queued_rows: expected >= 1, got {max_queued_rows}")
        if chunk_tokens < 1 or max_delay < 0:
            raise ValueError(f"chunk_tokens / max_delay: expected >= 1 / >= 0, got {chunk_tokens} / {max_delay}")
        if send_timeout <= 0 or open_timeout < 0 or reconnect_backoff <= 0:
            raise ValueError(
                "send_timeout / open_timeout / reconnect_backoff: expected > 0 / >= 0 / > 0, "
                f"got {send_timeout} / {open_timeout} / {reconnect_backoff}"
            )
        self.chunk_tokens = chunk_tokens
        self.max_delay = max_delay
        self.target = target
        self.model = model
        self.projected = projected
        self.max_queued_rows = max_queued_rows
        self.send_timeout = send_timeout
        self.open_timeout = open_timeout
        self.reconnect_backoff = reconnect_backoff
        self._on_halt = on_halt
        self._on_progress = on_progress
        self._decode = decode
        self._labels = dict(labels or {})
        self._token = token
        self._tls = (tls_ca, tls_cert, tls_key)
        self._lock = threading.Lock()
        self._queued_rows = 0
        self._stats = _Counters()
        # None: new requests are monitored; else the reason they are not (no catalog yet)
        self._off_reason: str | None = None
        self._off: dict[str, str] = {}  # request -> why: opened while monitoring was off (under the lock)
        self._requests: dict[str, _Request] = {}  # monitored requests (streams thread)
        self._tasks: set[asyncio.Task[None]] = set()  # (streams thread)
        self._warn = _RateLimited()  # (streams thread)
        self._keep_verdicts = keep_verdicts
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
        traceparent: str = "",
    ) -> None:
        """Start monitoring a request (the stream opens lazily with its first rows).

        ``request_id`` keys every later call (``push``, ``finish``, ``on_halt``); ``wire_id`` (default:
        the same) is the id the sidecar's verdict and audit record carry; ``traceparent`` the
        request's W3C trace context, which its evaluation events and exemplars then carry.

        Whether it is monitored is decided here, on the caller's thread: a request opened before
        the catalog arrived (``start_catalog``) stays unmonitored for its whole life, because
        its first rows were never read in the catalog's shape."""
        with self._lock:
            self._stats.requests += 1
            # opened again (preempted and resumed) after it was opened unmonitored: it stays so
            reason = self._off.get(request_id, self._off_reason)
            if reason is not None:
                self._stats.unmonitored[reason] += 1
                self._off[request_id] = reason
        if reason is not None:
            self._progress(request_id, -1, True)  # no verdict will come: nothing to wait for
        else:
            self._loop.call_soon_threadsafe(
                self._open, request_id, wire_id or request_id, list(prompt_ids), dict(labels or {}), traceparent
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
                n = _rows(rows)
                if rid in self._off:
                    self._stats.dropped["stream_failed"] += n
                elif self._queued_rows + n > self.max_queued_rows:
                    self._stats.dropped["queue_full"] += n
                else:
                    self._queued_rows += n
                    kept[rid] = dict(rows)
            dec = {rid: dict(d) for rid, d in (decisions or {}).items() if rid not in self._off}
        if kept or dec:
            self._loop.call_soon_threadsafe(self._dispatch, kept, dec)

    def finish(self, request_id: str, token_ids: Sequence[int]) -> None:
        """The request is over; ``token_ids`` are its output tokens (for the output text)."""
        with self._done_cv:
            if self._off.pop(request_id, None) is not None:
                self._record_done(request_id, None)
                return
        self._loop.call_soon_threadsafe(self._finish, request_id, list(token_ids))

    @property
    def stats(self) -> StreamStats:
        """All counters, taken together under one lock (safe to export as they are)."""
        with self._lock:
            return self._stats.snapshot()

    @property
    def monitoring(self) -> bool:
        """Whether a request opened now is monitored (False until ``start_catalog``'s catalog came)."""
        with self._lock:
            return self._off_reason is None

    # -- callers that may wait ----------------------------------------------------------------
    def catalog(self, timeout: float = 10.0) -> Catalog:
        """The sidecar's catalog (model, hook points, encoder slices); raises ``ClientError``."""
        fut = asyncio.run_coroutine_threadsafe(self._client.get_detectors(), self._loop)
        return fut.result(timeout)

    def start_catalog(self, on_catalog: Callable[[Catalog], None], retry_every: float = 0.5) -> None:
        """Fetch the catalog in the background, retrying until the sidecar answers, then call
        ``on_catalog(catalog)`` on the streams thread; from then on new requests are monitored.

        Until then (the sidecar is down at the engine's start: pod containers start in any
        order) requests are unmonitored (``sidecar_unavailable``) and their rows dropped, both
        counted; the engine starts and serves meanwhile. If ``on_catalog`` raises (a bundle for
        another model), monitoring stays off (``monitoring_off``) and the error is logged."""
        with self._lock:
            self._off_reason = "sidecar_unavailable"
        self._loop.call_soon_threadsafe(self._spawn, self._fetch_catalog(on_catalog, retry_every))

    def verdict(self, request_id: str, timeout: float = 30.0) -> ChunkVerdict | None:
        """The final verdict of a finished request (None when it was unmonitored, or on timeout).

        Only with ``keep_verdicts > 0``: the engine never reads verdicts back (the sidecar's audit
        log has them), so by default none is kept."""
        if self._keep_verdicts <= 0:
            raise ValueError("verdict(): this SidecarStreams keeps no verdicts (construct it with keep_verdicts > 0)")
        deadline = time.monotonic() + timeout
        with self._done_cv:
            while request_id not in self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._done_cv.wait(left)
            return self._done[request_id]

    def live(self, timeout: float = 10.0) -> LiveState:
        """What this object holds now (requests, tasks, queued rows), read on the streams thread
        after everything handed over before the call; for tests and debugging."""

        async def read() -> LiveState:
            with self._lock:
                return LiveState(
                    requests=len(self._requests) + len(self._off),
                    tasks=sum(not t.done() for t in self._tasks),
                    queued_rows=self._queued_rows,
                    verdicts=len(self._done),
                )

        return asyncio.run_coroutine_threadsafe(read(), self._loop).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        """Let running streams finish (up to ``timeout``), cancel the rest, then stop the thread."""
        fut = asyncio.run_coroutine_threadsafe(self._drain(timeout), self._loop)
        try:
            fut.result(timeout + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    # -- background thread ----------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = AsyncMonitorClient(
            self.target,
            token=self._token,
            tls_ca=self._tls[0],
            tls_cert=self._tls[1],
            tls_key=self._tls[2],
            send_timeout=self.send_timeout,
            open_timeout=self.open_timeout,
            max_backoff=self.reconnect_backoff,  # reconnect within this of the sidecar serving again
        )
        self._ready.set()
        self._loop.run_forever()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _fetch_catalog(self, on_catalog: Callable[[Catalog], None], retry_every: float) -> None:
        while True:
            try:
                catalog = await self._client.get_detectors(timeout=10.0, wait_for_ready=True)
                break
            except Exception as exc:  # down, restarting, or refusing: keep trying, the engine serves on
                self._warn.warning(
                    "catalog", "safety monitor: no catalog from sidecar %s yet (monitoring off): %s", self.target, exc
                )
                await asyncio.sleep(retry_every)
        if not self.model:
            self.model = catalog.model
        try:
            on_catalog(catalog)
        except Exception:
            log.exception("safety monitor: the sidecar's catalog was not accepted; monitoring stays off")
            with self._lock:
                self._off_reason = "monitoring_off"
            return
        with self._lock:
            self._off_reason = None
        log.info("safety monitor: catalog from %s received (model %s); monitoring on", self.target, catalog.model)

    def _open(
        self, request_id: str, wire_id: str, prompt_ids: list[int], labels: dict[str, str], traceparent: str = ""
    ) -> None:
        req = _Request(request_id, wire_id, prompt_ids, {**self._labels, **labels}, asyncio.Queue(), traceparent)
        old = self._requests.get(request_id)
        if old is not None:  # the engine opened an id twice: end the first, do not orphan it
            self._warn.warning("duplicate", "safety monitor: request %s opened twice", request_id)
            old.queue.put_nowait(_Item(final=True))
        self._requests[request_id] = req
        req.task = self._spawn(self._serve(req))

    def _dispatch(self, batch: dict[str, dict[str, np.ndarray]], decisions: dict[str, dict[str, np.ndarray]]) -> None:
        for rid in sorted(set(batch) | set(decisions), key=lambda r: r not in decisions):
            rows = batch.get(rid, {})
            req = self._requests.get(rid)
            if req is None:  # never opened (or already finished): nothing to attribute them to
                self._release(rows, "not_open")
                continue
            req.queue.put_nowait(_Item(rows, decision=decisions.get(rid, {})))

    def _finish(self, request_id: str, token_ids: list[int]) -> None:
        req = self._requests.get(request_id)
        if req is not None:
            req.queue.put_nowait(_Item(final=True, token_ids=token_ids))
        else:  # never opened here: no verdict will come
            self._progress(request_id, -1, True)

    def _progress(self, request_id: str, covered: int, done: bool) -> None:
        """Tell ``on_progress`` how many output tokens a verdict without HALT now covers (-1:
        none), and whether the request's last verdict came (or never will)."""
        if self._on_progress is None:
            return
        try:
            self._on_progress(request_id, covered, done)
        except Exception as exc:  # the engine side's callback: log it, keep monitoring
            self._warn.warning("on_progress", "safety monitor: on_progress failed for %s", request_id, exc_info=exc)

    def _release(self, rows: Mapping[str, np.ndarray], dropped: str | None) -> None:
        """Rows leave the queue: sent (``dropped`` None) or dropped for that reason."""
        n = _rows(rows)
        with self._lock:
            self._queued_rows -= n
            if dropped is None:
                self._stats.rows_sent += n
            else:
                self._stats.dropped[dropped] += n

    def _record_done(self, request_id: str, verdict: ChunkVerdict | None) -> None:
        """Keep the final verdict for ``verdict()`` when asked to (caller holds the lock)."""
        if self._keep_verdicts <= 0:
            return
        self._done[request_id] = verdict
        if len(self._done) > self._keep_verdicts:  # bounded: keep the most recent verdicts
            for key in list(self._done)[: max(1, self._keep_verdicts // 4)]:
                del self._done[key]
        self._done_cv.notify_all()

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
        token; HALT advice is at most one chunk late). Items taken stay in ``req.taken`` until
        sent or dropped, so nothing is lost if the task is cancelled meanwhile."""
        items = req.taken
        items.append(await req.queue.get())
        n = _rows(items[0].rows)
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
            n += _rows(items[-1].rows)
        return items

    def _unmonitored(self, req: _Request, reason: str, detail: object, exc: BaseException | None = None) -> None:
        req.reason = reason
        self._progress(req.request_id, -1, True)  # no verdict will come: release what is held now
        with self._lock:
            self._stats.unmonitored[reason] += 1
        self._warn.warning(
            reason, "safety monitor: request %s is unmonitored (%s): %s", req.request_id, reason, detail, exc_info=exc
        )

    def _drop_taken(self, req: _Request) -> None:
        for it in req.taken:
            self._release(it.rows, "stream_failed")
        req.taken = []

    async def _serve(self, req: _Request) -> None:
        """Send this request's chunks as they come; on any failure, drop the rest of its rows."""
        stream: AsyncScoreStream | None = None
        try:
            while True:
                items = await self._collect(req)
                final = next((it for it in items if it.final), None)
                if req.reason is not None:
                    self._drop_taken(req)
                elif stream is None and final is not None and not any(it.rows or it.decision for it in items):
                    # every row of this request was dropped (or it had none): nothing to score,
                    # and the sidecar refuses a stream without activations; it is unmonitored
                    self._unmonitored(req, "no_rows", "no activation row reached it")
                    self._drop_taken(req)
                else:
                    try:
                        stream = await self._send(req, stream, items, final)
                    except Exception as exc:  # whatever it is, it costs this request only
                        reason = _reason(exc)
                        self._unmonitored(req, reason, exc, exc if reason == "adapter_error" else None)
                        self._drop_taken(req)
                    else:
                        for it in items:
                            self._release(it.rows, None)
                        req.taken = []
                if final is not None:
                    break
        except asyncio.CancelledError:  # close() gave up waiting for this request
            if req.reason is None:
                self._unmonitored(req, "shutdown", "the adapter closed while it ran")
            raise
        except Exception as exc:  # a bug outside the send path: still one request's problem
            if req.reason is None:
                self._unmonitored(req, "adapter_error", exc, exc)
        finally:
            if stream is not None and req.reason is not None:
                stream.cancel()  # frees the sidecar's side now, not at its idle timeout
            self._drop_taken(req)
            while not req.queue.empty():
                self._release(req.queue.get_nowait().rows, "stream_failed")
            if self._requests.get(req.request_id) is req:  # not replaced by a second open
                del self._requests[req.request_id]
                cleared = req.last if req.reason is None and not req.halted else None
                self._progress(req.request_id, cleared.tokens_seen if cleared is not None else -1, True)
            with self._done_cv:
                if req.reason is None:
                    self._stats.finished += 1
                self._record_done(req.request_id, None if req.reason is not None else req.last)

    async def _send(
        self, req: _Request, stream: AsyncScoreStream | None, items: list[_Item], final: _Item | None
    ) -> AsyncScoreStream:
        """Merge the taken items into one chunk and send it; returns the (possibly new) stream."""
        rows: dict[str, list[np.ndarray]] = {}
        for it in items:
            for hp, a in it.rows.items():
                rows.setdefault(hp, []).append(a)
        merged = {hp: np.concatenate(parts) if len(parts) > 1 else parts[0] for hp, parts in rows.items()}
        decision = next((it.decision for it in items if it.decision), None)
        if stream is None:
            stream = self._client.stream(
                req.wire_id,
                self.model,
                prompt=self._text(req.prompt_ids),
                labels=req.labels,
                traceparent=req.traceparent,
            )
        try:
            text = self._text(final.token_ids) if final is not None else ""
            verdict = await stream.send(
                merged or None, text, final=final is not None, projected=self.projected, decision=decision
            )
        except BaseException:
            stream.cancel()
            raise
        req.last = verdict
        with self._lock:
            self._stats.chunks += 1
        if final is None and not verdict.halt and not req.halted:
            self._progress(req.request_id, verdict.tokens_seen, False)
        if verdict.halt and not req.halted:
            req.halted = True
            with self._lock:
                self._stats.halts += 1
            if self._on_halt is not None:
                try:
                    self._on_halt(req.request_id, verdict.reason)
                except Exception as exc:  # the engine side's callback: log it, keep monitoring
                    self._warn.warning("on_halt", "safety monitor: on_halt failed for %s", req.request_id, exc_info=exc)
        return stream

    async def _drain(self, timeout: float) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        streams = [r.task for r in self._requests.values() if r.task is not None]
        if streams:
            await asyncio.wait(streams, timeout=timeout)
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._client.close()
