"""The reference inference server: OpenAI-compatible chat completions, monitored by the sidecar."""

from monitor.reference._server import ChatRequest, ReferenceServer, RequestError, iter_sse

__all__ = ["ChatRequest", "ReferenceServer", "RequestError", "iter_sse"]
