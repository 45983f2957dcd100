"""The client's exceptions; gRPC status codes map onto them in one function.

ClientError
 ├── InvalidRequest   INVALID_ARGUMENT: the message names the field, expected and received
 ├── Unauthenticated  UNAUTHENTICATED: missing or wrong token
 ├── ServerBusy       RESOURCE_EXHAUSTED: the sidecar shed the request; retry later
 └── Unavailable      UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED: sidecar down or slow
"""

from __future__ import annotations

import grpc


class ClientError(Exception):
    """Base of every error raised by ``monitor.client``; ``code`` is the gRPC status name."""

    def __init__(self, message: str, code: str = "UNKNOWN") -> None:
        super().__init__(message)
        self.code = code


class InvalidRequest(ClientError):
    """The sidecar rejected the request's content."""


class Unauthenticated(ClientError):
    """The sidecar requires a (different) bearer token."""


class ServerBusy(ClientError):
    """The sidecar is at its in-flight limit."""


class Unavailable(ClientError):
    """The sidecar could not be reached in time."""


_BY_CODE: dict[grpc.StatusCode, type[ClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ServerBusy,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.CANCELLED: Unavailable,
}

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.CANCELLED,
    }
)


def map_rpc_error(exc: grpc.RpcError) -> ClientError:
    """The most specific ``ClientError`` for a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    cls = _BY_CODE.get(code, ClientError)
    return cls(f"{code.name}: {details}", code.name)
