"""Blocking client with a non-blocking ``submit()`` for inference servers."""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any

import grpc

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.client import _wire
from monitor.client._errors import RETRYABLE, ClientError, map_rpc_error
from monitor.client._types import Catalog, ChunkVerdict, Generation, IngestReport, ScoreReply

log = logging.getLogger("monitor.client")

_DONE = object()


class _Counters:
    """Thread-safe delivery counters shared by the sync and async clients."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.submitted = 0
        self.delivered = 0
        self.rejected = 0
        self.dropped = 0
        self.send_failures = 0

    def add(self, **deltas: int) -> None:
        with self._lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)


class _DeliveryCounts:
    """Read-only delivery counters shared by the sync and async clients."""

    _counters: _Counters

    @property
    def submitted(self) -> int:
        """Generations accepted into the queue."""
        return self._counters.submitted

    @property
    def delivered(self) -> int:
        """Generations the sidecar acknowledged as scored."""
        return self._counters.delivered

    @property
    def rejected(self) -> int:
        """Generations the sidecar refused as invalid (they are not retried)."""
        return self._counters.rejected

    @property
    def dropped(self) -> int:
        """Generations dropped: queue full, client closing, or a non-retryable send error."""
        return self._counters.dropped

    @property
    def send_failures(self) -> int:
        """Failed delivery attempts (each followed by a backoff and a retry)."""
        return self._counters.send_failures


class MonitorClient(_DeliveryCounts):
    """Talks to one sidecar.

    ``score``/``ingest``/``get_detectors``/``stream`` are blocking calls that raise
    ``ClientError`` subclasses. ``submit`` never blocks: it queues the generation (bounded by
    ``queue_size``) for a background sender that batches items over ``Ingest``, retries with
    exponential backoff while the sidecar is unreachable, and counts what it had to drop.
    ``tls_ca`` / ``tls_cert`` / ``tls_key`` (PEM files; ``tls=True`` alone trusts the system
    roots) connect over TLS; a certificate and key make it mutual TLS.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        token: str | None = None,
        timeout: float = 10.0,
        queue_size: int = 1024,
        batch_size: int = 32,
        max_backoff: float = 5.0,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size and batch_size: expected >= 1, got {queue_size}, {batch_size}")
        self.target = target
        self.timeout = timeout
        self.max_backoff = max_backoff
        self._metadata = (("authorization", f"Bearer {token}"),) if token else None
        options = _wire.channel_options(max_message_bytes, max_backoff)
        if tls or tls_ca or tls_cert or tls_key:
            creds = _wire.TlsSettings(tls_ca, tls_cert, tls_key).credentials()
            self._channel = grpc.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.SafetyMonitorStub(self._channel)
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._counters = _Counters()
        self._closing = threading.Event()
        self._idle = threading.Condition()
        self._busy = 0  # items taken from the queue and not yet settled
        self._sender: threading.Thread | None = None
        self._sender_lock = threading.Lock()

    # -- blocking RPCs --------------------------------------------------------------------------
    def score(self, generation: Generation, *, timeout: float | None = None) -> ScoreReply:
        """Score one finished generation and return the sidecar's verdict."""
        try:
            resp = self._stub.Score(_wire.request(generation), timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.score_reply(resp)

    def ingest(self, generations: Iterable[Generation], *, timeout: float | None = None) -> IngestReport:
        """Send many generations on one Ingest stream; returns after all were recorded."""
        try:
            summary = self._stub.Ingest(
                (_wire.request(g) for g in generations), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.ingest_report(summary)

    def get_detectors(self, *, timeout: float | None = None) -> Catalog:
        """What the sidecar's bundle expects (model, hook points, d_model, detectors)."""
        try:
            return _wire.catalog(
                self._stub.GetDetectors(
                    pb.GetDetectorsRequest(), timeout=timeout or self.timeout, metadata=self._metadata
                )
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None

    def stream(
        self,
        request_id: str,
        model: str,
        *,
        prompt: str = "",
        labels: Mapping[str, str] | None = None,
        traceparent: str = "",
    ) -> ScoreStream:
        """Open a ScoreStream for a running generation; ``send`` a chunk, get its verdict.
        ``traceparent``: the W3C trace context of the request being generated (see ``Generation``)."""
        return ScoreStream(self, request_id, model, prompt, dict(labels or {}), traceparent)

    # -- fire and forget ----------------------------------------------------------------------
    def submit(self, generation: Generation) -> bool:
        """Queue a generation for background delivery; never blocks. False when it was dropped."""
        if self._closing.is_set():
            self._counters.add(dropped=1)
            return False
        self._ensure_sender()
        try:
            self._queue.put_nowait(generation)
        except queue.Full:
            self._counters.add(dropped=1)
            return False
        self._counters.add(submitted=1)
        return True

    @property
    def pending(self) -> int:
        """Generations queued or being sent."""
        with self._idle:
            return self._queue.qsize() + self._busy

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued generation is settled; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._queue.qsize() + self._busy == 0, timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), count the rest as dropped, close the channel."""
        self.flush(timeout)
        self._closing.set()
        if self._sender is not None:
            self._queue.put(_DONE)
            self._sender.join(timeout=max(timeout, 1.0))
        leftover = 0
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            leftover += item is not _DONE
        self._counters.add(dropped=leftover)
        self._channel.close()

    def __enter__(self) -> MonitorClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- sender thread ---------------------------------------------------------------------
    def _ensure_sender(self) -> None:
        if self._sender is None:
            with self._sender_lock:
                if self._sender is None:
                    self._sender = threading.Thread(target=self._send_loop, name="monitor-sender", daemon=True)
                    self._sender.start()

    def _take_batch(self) -> list[Generation] | None:
        item = self._queue.get()
        if item is _DONE:
            return None
        batch = [item]
        while len(batch) < self._batch_size:
            try:
                nxt = self._queue.get_nowait()
            except queue.Empty:
                break
            if nxt is _DONE:
                self._queue.put(_DONE)
                break
            batch.append(nxt)
        with self._idle:
            self._busy += len(batch)
        return batch

    def _settle(self, n: int) -> None:
        with self._idle:
            self._busy -= n
            self._idle.notify_all()

    def _send_loop(self) -> None:
        backoff = 0.1
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            messages, unencodable = _wire.requests(batch)
            for rid, err in unencodable:
                log.warning("dropping generation %s that could not be encoded: %s: %s", rid, type(err).__name__, err)
            self._counters.add(dropped=len(unencodable))
            while messages:
                try:
                    summary = self._stub.Ingest(iter(messages), timeout=self.timeout, metadata=self._metadata)
                except grpc.RpcError as exc:
                    code = exc.code() if hasattr(exc, "code") else None
                    if code in RETRYABLE and not self._closing.is_set():
                        self._counters.add(send_failures=1)
                        log.debug("sidecar unreachable (%s); retrying in %.2f s", code, backoff)
                        self._closing.wait(backoff)
                        backoff = min(backoff * 2, self.max_backoff)
                        continue
                    log.warning("dropping %d generations: %s", len(messages), map_rpc_error(exc))
                    self._counters.add(dropped=len(messages))
                else:
                    backoff = 0.1
                    self._counters.add(delivered=summary.accepted, rejected=summary.rejected)
                    for e in summary.errors:
                        log.warning("sidecar rejected %s: %s", e.request_id, e.message)
                break
            self._settle(len(batch))


class _StreamChunks:
    """A stream's identity and chunk numbering, shared by the sync and async streams.

    The first chunk carries model, prompt, labels and trace context; later ones only the request id.
    """

    def __init__(self, request_id: str, model: str, prompt: str, labels: dict[str, str], traceparent: str = "") -> None:
        self.request_id = request_id
        self._model = model
        self._prompt = prompt
        self._labels = labels
        self._traceparent = traceparent
        self._sent = 0
        self._closed = False

    def _next_chunk(
        self,
        activations: Mapping[str, Any] | None,
        text_delta: str,
        final: bool,
        projected: bool = False,
        decision: Mapping[str, Any] | None = None,
    ) -> pb.ScoreChunk:
        if self._closed:
            raise ClientError("stream: already closed", "FAILED_PRECONDITION")
        msg = _wire.chunk(
            request_id=self.request_id,
            model=self._model,
            prompt=self._prompt,
            labels=self._labels,
            first=self._sent == 0,
            text_delta=text_delta,
            activations=activations or {},
            final=final,
            projected=projected,
            decision=decision,
            traceparent=self._traceparent,
        )
        self._sent += 1
        return msg


class ScoreStream(_StreamChunks):
    """One running generation on a ScoreStream call (blocking)."""

    def __init__(
        self,
        client: MonitorClient,
        request_id: str,
        model: str,
        prompt: str,
        labels: dict[str, str],
        traceparent: str = "",
    ) -> None:
        super().__init__(request_id, model, prompt, labels, traceparent)
        self._chunks: queue.Queue[Any] = queue.Queue()
        self._responses: Iterator[pb.Verdict] = client._stub.ScoreStream(self._requests(), metadata=client._metadata)

    def _requests(self) -> Iterator[pb.ScoreChunk]:
        while True:
            item = self._chunks.get()
            if item is _DONE:
                return
            yield item

    def send(
        self,
        activations: Mapping[str, Any] | None = None,
        text_delta: str = "",
        *,
        final: bool = False,
        projected: bool = False,
        decision: Mapping[str, Any] | None = None,
    ) -> ChunkVerdict:
        """Send the new tokens' activations (hook point -> [new_tokens, d_model], or [new_tokens, K]
        pre-activations of the catalog's encoder slice with ``projected=True``); get the verdict.
        ``decision``: hook point -> [1, width] at the last prompt-template token (once per stream)."""
        self._chunks.put(self._next_chunk(activations, text_delta, final, projected, decision))
        try:
            verdict = _wire.chunk_verdict(next(self._responses))
        except grpc.RpcError as exc:
            self._closed = True
            self._chunks.put(_DONE)
            raise map_rpc_error(exc) from None
        except StopIteration:
            self._closed = True
            raise ClientError("stream: server ended the stream", "UNKNOWN") from None
        if final:
            self.close()
        return verdict

    def close(self) -> None:
        """End the request stream (the server finishes the call)."""
        if not self._closed:
            self._closed = True
            self._chunks.put(_DONE)
            for _ in self._responses:  # drain so the call completes cleanly
                pass

    def __enter__(self) -> ScoreStream:
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.close()
