"""Bearer-token check for the SafetyMonitor RPCs (health and reflection stay open for probes).

The decision is made from the call's metadata alone, before a byte of the body is read: a
rejected call is answered by a handler that never reads its request, so an unauthenticated
client cannot make the sidecar buffer or parse a large message.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

SERVICE_PREFIX = "/safety_monitor.v1.SafetyMonitor/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless metadata carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self._expected = token.encode()
        self._on_reject = on_reject

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        handler = await continuation(handler_call_details)
        if handler is None or not method.startswith(SERVICE_PREFIX):
            return handler
        problem = self.check(handler_call_details.invocation_metadata or ())
        if problem is None:
            return handler
        rpc = method[len(SERVICE_PREFIX) :]
        if self._on_reject is not None:
            self._on_reject(rpc)
        return _rejecting_handler(handler, f"authorization: expected one 'Bearer <token>' header, got {problem}")

    def check(self, metadata: Iterable[tuple[str, Any]]) -> str | None:
        """None when the metadata carries exactly one valid bearer token, else what is wrong.

        The scheme is case-insensitive (RFC 7235); a repeated header is refused rather than
        letting the first or last one win.
        """
        values = [v for k, v in metadata if k.lower() == "authorization"]
        if not values:
            return "none"
        if len(values) > 1:
            return f"{len(values)} authorization headers"
        value = values[0].decode("latin-1") if isinstance(values[0], bytes) else str(values[0])
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return "another scheme" if token else "a malformed value"
        if hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._expected):
            return None
        return "a wrong token"


def _rejecting_handler(like: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED without reading the request.

    It is registered as request-streaming whatever the method is: gRPC then calls it at once,
    before the request message arrives, and never deserializes the body.
    """

    async def unary(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request_iterator: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {"request_deserializer": _ignore_body, "response_serializer": like.response_serializer}
    if like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    return grpc.stream_unary_rpc_method_handler(unary, **kw)


def _ignore_body(data: bytes) -> None:
    return None
