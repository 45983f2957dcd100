"""asyncio twin of ``MonitorClient``: same names, ``await`` where the sync one blocks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import grpc

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.client import _wire
from monitor.client._errors import RETRYABLE, map_rpc_error
from monitor.client._sync import _Counters, _DeliveryCounts, _StreamChunks
from monitor.client._types import Catalog, ChunkVerdict, Generation, IngestReport, ScoreReply

log = logging.getLogger("monitor.client")


class AsyncMonitorClient(_DeliveryCounts):
    """Talks to one sidecar from asyncio code; ``submit()`` is synchronous and never waits."""

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
            self._channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = pb_grpc.SafetyMonitorStub(self._channel)
        self._queue: asyncio.Queue[Generation] = asyncio.Queue(maxsize=queue_size)
        self._batch_size = batch_size
        self._counters = _Counters()
        self._closing = False
        self._sender: asyncio.Task[None] | None = None
        self._busy = 0

    # -- RPCs -----------------------------------------------------------------------------------
    async def score(self, generation: Generation, *, timeout: float | None = None) -> ScoreReply:
        """Score one finished generation and return the sidecar's verdict."""
        try:
            resp = await self._stub.Score(
                _wire.request(generation), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.score_reply(resp)

    async def ingest(self, generations: Iterable[Generation], *, timeout: float | None = None) -> IngestReport:
        """Send many generations on one Ingest stream; returns after all were recorded."""
        try:
            summary = await self._stub.Ingest(
                (_wire.request(g) for g in generations), timeout=timeout or self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.ingest_report(summary)

    async def get_detectors(self) -> Catalog:
        """What the sidecar's bundle expects (model, hook points, d_model, detectors)."""
        try:
            resp = await self._stub.GetDetectors(
                pb.GetDetectorsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.catalog(resp)

    def stream(
        self, request_id: str, model: str, *, prompt: str = "", labels: Mapping[str, str] | None = None
    ) -> AsyncScoreStream:
        """Open a ScoreStream for a running generation; ``await send(...)`` per chunk."""
        return AsyncScoreStream(self, request_id, model, prompt, dict(labels or {}))

    # -- fire and forget ---------------------------------------------------------------------
    def submit(self, generation: Generation) -> bool:
        """Queue a generation for background delivery; never waits. False when dropped."""
        if self._closing:
            self._counters.add(dropped=1)
            return False
        if self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        try:
            self._queue.put_nowait(generation)
        except asyncio.QueueFull:
            self._counters.add(dropped=1)
            return False
        self._counters.add(submitted=1)
        return True

    @property
    def pending(self) -> int:
        return self._queue.qsize() + self._busy

    async def flush(self, timeout: float = 10.0) -> bool:
        """Wait until every queued generation is settled; False on timeout."""
        try:
            await asyncio.wait_for(self._queue.join(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), count the rest as dropped, close."""
        await self.flush(timeout)
        self._closing = True
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        self._counters.add(dropped=self._queue.qsize() + self._busy)
        await self._channel.close()

    async def __aenter__(self) -> AsyncMonitorClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def _send_loop(self) -> None:
        backoff = 0.1
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._batch_size and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            self._busy = len(batch)
            messages, unencodable = _wire.requests(batch)
            for rid, err in unencodable:
                log.warning("dropping generation %s that could not be encoded: %s: %s", rid, type(err).__name__, err)
            self._counters.add(dropped=len(unencodable))
            try:
                while messages:
                    try:
                        summary = await self._stub.Ingest(iter(messages), timeout=self.timeout, metadata=self._metadata)
                    except grpc.RpcError as exc:
                        if exc.code() in RETRYABLE:
                            self._counters.add(send_failures=1)
                            await asyncio.sleep(backoff)
                            backoff = min(backoff * 2, self.max_backoff)
                            continue
                        log.warning("dropping %d generations: %s", len(messages), map_rpc_error(exc))
                        self._counters.add(dropped=len(messages))
                    else:
                        backoff = 0.1
                        self._counters.add(delivered=summary.accepted, rejected=summary.rejected)
                    break
            finally:
                self._busy = 0
                for _ in batch:
                    self._queue.task_done()


class _Status(grpc.RpcError):
    """A finished call's status in the shape ``map_rpc_error`` reads."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class AsyncScoreStream(_StreamChunks):
    """One running generation on a ScoreStream call (asyncio)."""

    def __init__(
        self, client: AsyncMonitorClient, request_id: str, model: str, prompt: str, labels: dict[str, str]
    ) -> None:
        super().__init__(request_id, model, prompt, labels)
        self._call: Any = client._stub.ScoreStream(metadata=client._metadata)

    async def send(
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
        msg = self._next_chunk(activations, text_delta, final, projected, decision)
        try:
            await self._call.write(msg)
            resp = await self._call.read()
        except grpc.RpcError as exc:
            self._closed = True
            raise map_rpc_error(exc) from None
        if resp is grpc.aio.EOF:
            self._closed = True
            code = await self._call.code()
            details = await self._call.details()
            raise map_rpc_error(_Status(code, details or "server ended the stream"))
        if final:
            await self.close()
        return _wire.chunk_verdict(resp)

    async def close(self) -> None:
        """End the request stream."""
        if not self._closed:
            self._closed = True
            await self._call.done_writing()
            await self._call.code()  # waits for the server to finish the call

    async def __aenter__(self) -> AsyncScoreStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
