"""The ``/metrics`` HTTP(S) endpoint: a thread per connection, bounded handshakes and reads, a TLS
context that can be replaced whole, optional bearer auth.

prometheus_client's server wraps the *listening* socket in TLS, so ``accept`` runs each handshake
on the one serving thread: a single silent TCP connection stalled every scrape. Here the listening
socket is plain and each connection is wrapped in its own thread, under a timeout, with whatever
context is current; a reload builds a fresh context, so a replaced client-CA file stops trusting
the old CA (``load_verify_locations`` on the old context only ever added CAs). A client that goes
away early is one rate-limited log line, not a traceback.
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import ServerHandler, WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry, make_wsgi_app

from monitor.server._ratelog import RateLimitedLog

log = logging.getLogger("monitor.server")

__all__ = ["HANDSHAKE_SECONDS", "IO_SECONDS", "MetricsServer"]

HANDSHAKE_SECONDS = 5.0  # a TLS handshake that takes longer is dropped
IO_SECONDS = 10.0  # a connection silent this long mid-request is dropped
MAX_CONNECTIONS = 64  # connections served at once; more are closed at accept

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class _QuietServerHandler(ServerHandler):
    """wsgiref's response writer, which prints a traceback when the client has gone: one line instead."""

    def __init__(self, *args: Any, report: Callable[[BaseException | None], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._report = report

    def log_exception(self, exc_info: Any) -> None:
        self._report(exc_info[1])


class _Handler(WSGIRequestHandler):
    """No access log; every read and write bounded by ``IO_SECONDS``; no traceback per lost client."""

    timeout = IO_SECONDS
    server: MetricsServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def handle(self) -> None:
        """``WSGIRequestHandler.handle`` with the quiet response writer."""
        self.raw_requestline = self.rfile.readline(65537)
        if len(self.raw_requestline) > 65536:
            self.send_error(414)
            return
        if not self.parse_request():
            return
        writer = _QuietServerHandler(
            self.rfile,
            self.wfile,
            self.get_stderr(),
            self.get_environ(),
            multithread=False,
            report=lambda exc: self.server.client_lost(self.client_address, exc),
        )
        writer.request_handler = self  # type: ignore[attr-defined]
        writer.run(self.server.get_app())  # type: ignore[arg-type]


class MetricsServer(ThreadingMixIn, WSGIServer):
    """Serves ``registry`` on (host, port); TLS when ``context`` is set, bearer auth when ``token`` is."""

    daemon_threads = True

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        context: ssl.SSLContext | None = None,
        token: str | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, port), _Handler)
        self.context = context
        self._on_reject = on_reject
        self._log = RateLimitedLog(log, interval=60.0)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        app: WsgiApp = make_wsgi_app(registry)
        self.set_app(_with_auth(app, token, self._reject) if token else app)
        self._thread = threading.Thread(target=self.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()

    def set_context(self, context: ssl.SSLContext) -> None:
        """New connections use ``context`` (a reloaded certificate or client CA)."""
        self.context = context

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self._reject("too_many_connections")
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Handshake (bounded) in this connection's own thread, then serve the request."""
        context = self.context
        if context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(HANDSHAKE_SECONDS)
        try:
            tls = context.wrap_socket(request, server_side=True)
        except (OSError, ValueError) as exc:  # timeout, bad certificate, plain HTTP, early close
            self._reject("tls_handshake", f"/metrics: TLS handshake with {client_address[0]} failed: {exc}")
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that closed early or stalled: one rate-limited line, no traceback."""
        self.client_lost(client_address, sys.exc_info()[1])

    def client_lost(self, client_address: Any, exc: BaseException | None) -> None:
        """Count and log (rate-limited) a client that went away mid-request."""
        self._reject("connection", f"/metrics: connection from {client_address[0]} ended: {exc!r}")

    def _reject(self, reason: str, message: str | None = None) -> None:
        if self._on_reject is not None:
            self._on_reject(reason)
        if message is not None:
            self._log.warning(reason, "%s", message)

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def _with_auth(app: WsgiApp, token: str, reject: Callable[[str], None]) -> WsgiApp:
    """``app`` behind ``Authorization: Bearer <token>`` (401 otherwise, counted)."""
    expected = token.encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        scheme, _, value = str(environ.get("HTTP_AUTHORIZATION", "")).strip().partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(value.strip().encode("utf-8", "replace"), expected):
            return app(environ, start_response)
        reject("unauthorized")
        headers = [("Content-Type", "text/plain; charset=utf-8"), ("WWW-Authenticate", 'Bearer realm="metrics"')]
        start_response("401 Unauthorized", headers)
        return [b"metrics_auth: expected header 'Authorization: Bearer <token>'\n"]

    return guarded
