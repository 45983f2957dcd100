"""Bearer-token check for the SafetyMonitor RPCs (health and reflection stay open for probes)."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

SERVICE_PREFIX = "/safety_monitor.v1.SafetyMonitor/"


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Answers UNAUTHENTICATED unless metadata carries ``authorization: Bearer <token>``."""

    def __init__(self, token: str, on_reject: Callable[[str], None] | None = None) -> None:
        self._expected = f"Bearer {token}".encode()
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
        sent = dict(handler_call_details.invocation_metadata or ()).get("authorization", "")
        if hmac.compare_digest(str(sent).encode(), self._expected):
            return handler
        rpc = method[len(SERVICE_PREFIX) :]
        if self._on_reject is not None:
            self._on_reject(rpc)
        return _rejecting_handler(
            handler, "authorization: expected 'Bearer <token>' metadata, got " + ("a wrong token" if sent else "none")
        )


def _rejecting_handler(like: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover - makes this an async generator

    kw = {
        "request_deserializer": like.request_deserializer,
        "response_serializer": like.response_serializer,
    }
    if like.request_streaming and like.response_streaming:
        return grpc.stream_stream_rpc_method_handler(streaming, **kw)
    if like.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unary, **kw)
    if like.response_streaming:
        return grpc.unary_stream_rpc_method_handler(streaming, **kw)
    return grpc.unary_unary_rpc_method_handler(unary, **kw)
