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
from monitor.client._errors import RETRYABLE, Unavailable, map_rpc_error
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
        send_timeout: float | None = None,
        open_timeout: float = 2.0,
        tls: bool = False,
        tls_ca: str | None = None,
        tls_cert: str | None = None,
        tls_key: str | None = None,
    ) -> None:
        if queue_size < 1 or batch_size < 1:
            raise ValueError(f"queue_size and batch_size: expected >= 1, got {queue_size}, {batch_size}")
        if (send_timeout is not None and send_timeout <= 0) or open_timeout < 0:
            raise ValueError(f"send_timeout / open_timeout: expected > 0 / >= 0, got {send_timeout} / {open_timeout}")
        self.target = target
        self.timeout = timeout
        # a stalled sidecar must not hold a stream forever: each chunk's verdict has a deadline
        self.send_timeout = timeout if send_timeout is None else send_timeout
        # a stream opened while the channel reconnects waits this long for it instead of failing at once
        self.open_timeout = open_timeout
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

    async def get_detectors(self, *, timeout: float | None = None, wait_for_ready: bool = False) -> Catalog:
        """What the sidecar's bundle expects (model, hook points, d_model, detectors).

        ``wait_for_ready``: wait (up to ``timeout``) for a sidecar that is down or restarting
        instead of failing at once, so the catalog arrives as soon as it serves."""
        try:
            resp = await self._stub.GetDetectors(
                pb.GetDetectorsRequest(),
                timeout=timeout or self.timeout,
                metadata=self._metadata,
                wait_for_ready=wait_for_ready,
            )
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return _wire.catalog(resp)

    def stream(
        self,
        request_id: str,
        model: str,
        *,
        prompt: str = "",
        labels: Mapping[str, str] | None = None,
        traceparent: str = "",
    ) -> AsyncScoreStream:
        """Open a ScoreStream for a running generation; ``await send(...)`` per chunk.
        ``traceparent``: the W3C trace context of the request being generated (see ``Generation``)."""
        return AsyncScoreStream(self, request_id, model, prompt, dict(labels or {}), traceparent)

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
    def connected(self) -> bool:
        """Whether the channel is READY now (does not try to connect)."""
        return bool(self._channel.get_state(try_to_connect=False) == grpc.ChannelConnectivity.READY)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the channel to be READY (connecting if idle); False on timeout."""
        if self.connected:
            return True
        try:
            await asyncio.wait_for(self._channel.channel_ready(), timeout)
        except TimeoutError:
            return False
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
    """One running generation on a ScoreStream call (asyncio).

    The call waits for a reconnecting channel (``wait_for_ready``), bounded by the client's
    ``open_timeout`` on the first chunk; every chunk's verdict is bounded by ``send_timeout``.
    On any failure the call is cancelled, so the sidecar frees its side of the stream at once.
    """

    def __init__(
        self,
        client: AsyncMonitorClient,
        request_id: str,
        model: str,
        prompt: str,
        labels: dict[str, str],
        traceparent: str = "",
    ) -> None:
        super().__init__(request_id, model, prompt, labels, traceparent)
        self._client = client
        self._call: Any = client._stub.ScoreStream(metadata=client._metadata, wait_for_ready=True)

    async def send(
        self,
        activations: Mapping[str, Any] | None = None,
        text_delta: str = "",
        *,
        final: bool = False,
        projected: bool = False,
        decision: Mapping[str, Any] | None = None,
        timeout: float | None = None,
    ) -> ChunkVerdict:
        """Send the new tokens' activations (hook point -> [new_tokens, d_model], or [new_tokens, K]
        pre-activations of the catalog's encoder slice with ``projected=True``); get the verdict.
        ``decision``: hook point -> [1, width] at the last prompt-template token (once per stream).
        Raises ``Unavailable`` (code ``DEADLINE_EXCEEDED``) when no verdict came within ``timeout``
        (default: the client's ``send_timeout``), ``UNAVAILABLE`` when the sidecar was unreachable."""
        try:
            msg = self._next_chunk(activations, text_delta, final, projected, decision)
        except BaseException:
            self.cancel()  # e.g. an array the wire cannot carry: the call must not linger
            raise
        client = self._client
        if self._sent == 1 and not await client.wait_connected(client.open_timeout):
            self.cancel()
            raise Unavailable(
                f"UNAVAILABLE: sidecar {client.target} not reachable within {client.open_timeout:.1f} s", "UNAVAILABLE"
            )
        limit = client.send_timeout if timeout is None else timeout
        try:
            resp = await asyncio.wait_for(self._exchange(msg, final), limit)
        except TimeoutError:
            self.cancel()
            if not client.connected:
                raise Unavailable(f"UNAVAILABLE: sidecar {client.target} went away", "UNAVAILABLE") from None
            raise Unavailable(f"DEADLINE_EXCEEDED: no verdict within {limit:.1f} s", "DEADLINE_EXCEEDED") from None
        except BaseException:
            self.cancel()
            raise
        return _wire.chunk_verdict(resp)

    async def _exchange(self, msg: pb.ScoreChunk, final: bool) -> pb.Verdict:
        try:
            try:
                await self._call.write(msg)
            except asyncio.InvalidStateError:  # the call already ended (e.g. the sidecar went away)
                code, details = await self._call.code(), await self._call.details()
                raise map_rpc_error(_Status(code, details or "the stream had ended")) from None
            resp = await self._call.read()
            if resp is grpc.aio.EOF:
                code = await self._call.code()
                details = await self._call.details()
                raise map_rpc_error(_Status(code, details or "server ended the stream"))
            if final:
                await self.close()
        except grpc.RpcError as exc:
            raise map_rpc_error(exc) from None
        return resp

    def cancel(self) -> None:
        """Abandon the stream (no verdict comes); a no-op once it has ended."""
        self._closed = True
        self._call.cancel()

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
