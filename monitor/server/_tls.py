"""TLS and mutual TLS for gRPC and ``/metrics``, with certificates re-read when their files change.

Certificates rotate (cert-manager, Vault): the sidecar must pick up a renewed certificate
without a restart. gRPC asks ``_Reloader`` for a new configuration at each handshake (it answers
None while the files are unchanged); the ``/metrics`` server's SSL context is reloaded in place by
``reload_metrics_context``, which the lifecycle calls every few seconds.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger("monitor.server")

__all__ = ["TlsFiles", "metrics_tls_kwargs", "reload_metrics_context", "server_credentials"]


class TlsFiles:
    """The PEM files of one server identity (and the client CA for mutual TLS)."""

    def __init__(self, cert: str, key: str, client_ca: str | None = None) -> None:
        self.cert = Path(cert)
        self.key = Path(key)
        self.client_ca = Path(client_ca) if client_ca else None
        self._lock = threading.Lock()
        self._stamp = self.stamp()

    def stamp(self) -> tuple[tuple[int, int], ...]:
        """(mtime_ns, size) of each file: changes when a file is replaced or rewritten."""
        out = []
        for p in (self.cert, self.key, self.client_ca):
            if p is not None:
                st = os.stat(p)
                out.append((st.st_mtime_ns, st.st_size))
        return tuple(out)

    def changed(self) -> bool:
        """True once per change of any file (the caller then reloads)."""
        try:
            now = self.stamp()
        except OSError:  # mid-rotation: a file is briefly missing; keep the old identity
            return False
        with self._lock:
            if now == self._stamp:
                return False
            self._stamp = now
            return True

    def grpc_configuration(self) -> grpc.ServerCertificateConfiguration:
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_certificate_configuration(
            [(self.key.read_bytes(), self.cert.read_bytes())], root_certificates=ca
        )


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """gRPC server credentials that follow ``files``; mutual TLS when a client CA is set."""
    initial = files.grpc_configuration()

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        if not files.changed():
            return None
        try:
            config = files.grpc_configuration()
        except (OSError, ValueError) as exc:
            log.warning("tls: could not reload %s: %s; keeping the previous certificate", files.cert, exc)
            return None
        log.info("tls: reloaded gRPC certificate from %s", files.cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=files.client_ca is not None
    )


def metrics_tls_kwargs(files: TlsFiles) -> dict[str, object]:
    """Keyword arguments of ``prometheus_client.start_http_server`` for TLS (and client certs)."""
    kw: dict[str, object] = {"certfile": str(files.cert), "keyfile": str(files.key)}
    if files.client_ca is not None:
        kw.update(client_cafile=str(files.client_ca), client_auth_required=True)
    return kw


def reload_metrics_context(context: ssl.SSLContext, files: TlsFiles) -> None:
    """Load the current files into the ``/metrics`` server's context (new connections use them)."""
    try:
        context.load_cert_chain(str(files.cert), str(files.key))
        if files.client_ca is not None:
            context.load_verify_locations(cafile=str(files.client_ca))
    except (OSError, ssl.SSLError) as exc:
        log.warning("tls: could not reload /metrics certificate %s: %s", files.cert, exc)
    else:
        log.info("tls: reloaded /metrics certificate from %s", files.cert)
