"""TLS and mutual TLS for gRPC and ``/metrics``, with certificates re-read when their files change.

Certificates rotate (cert-manager, Vault): the sidecar must pick up a renewed certificate
without a restart. gRPC asks ``_Reloader`` for a new configuration at each handshake (it answers
None while the files are unchanged); for ``/metrics`` the lifecycle builds a fresh context with
``metrics_context`` every few seconds when a file changed, so a replaced client CA is the only
one trusted, as on gRPC.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

log = logging.getLogger("monitor.server")

__all__ = ["TlsFiles", "metrics_context", "server_credentials"]


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


def metrics_context(files: TlsFiles) -> ssl.SSLContext:
    """A new server context for ``/metrics`` from the current files (client certs required with a CA).

    Raises ``OSError`` / ``ssl.SSLError`` when a file cannot be read or parsed.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(files.cert), str(files.key))
    if files.client_ca is not None:
        context.load_verify_locations(cafile=str(files.client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
