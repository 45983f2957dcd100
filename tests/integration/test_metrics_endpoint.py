"""The /metrics endpoint against hostile and careless clients: silent TLS connections, clients that
close early, a replaced client CA, and optional bearer auth. Real servers on 127.0.0.1."""

from __future__ import annotations

import shutil
import socket
import ssl
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.certs import TestCA
from tests.conftest import ServeProcess, ServerThread, config, sample


def https_get(url: str, ca: str, cert: tuple[str, str] | None = None, headers: dict[str, str] | None = None) -> str:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    req = urllib.request.Request(url, headers=headers or {})
    return urllib.request.urlopen(req, timeout=10, context=ctx).read().decode()


def test_a_silent_tcp_connection_does_not_stall_https_scrapes(tmp_path: Path) -> None:
    """The listening socket used to do each TLS handshake in accept(): one silent peer blocked them all."""
    ca = TestCA(tmp_path, "main")
    srv = ca.issue("sidecar", server=True)
    st = ServerThread(config(tls_cert=srv.cert, tls_key=srv.key))
    silent = socket.create_connection(("127.0.0.1", st.server.metrics_port))
    try:
        url = f"https://localhost:{st.server.metrics_port}/metrics"
        for _ in range(4):
            assert "safety_monitor_requests_total" in https_get(url, str(ca.pem))
        silent.settimeout(30)  # the handshake bound (5 s) plus slack for shared cores
        assert silent.recv(1) == b"", "the server sent bytes to a client that never said hello"  # dropped
        text = https_get(url, str(ca.pem))
        assert 'safety_monitor_metrics_rejected_total{reason="tls_handshake"} 1.0' in text
    finally:
        silent.close()
        st.stop()


def test_https_clients_that_close_early_leave_no_traceback(tmp_path: Path) -> None:
    ca = TestCA(tmp_path, "main")
    srv = ca.issue("sidecar", server=True)
    server = ServeProcess("--tls-cert", srv.cert, "--tls-key", srv.key, log_path=tmp_path / "server.log")
    try:
        _wait_https(server.metrics_port, str(ca.pem))
        ctx = ssl.create_default_context(cafile=str(ca.pem))
        for i in range(9):
            raw = socket.create_connection(("127.0.0.1", server.metrics_port))
            if i % 3 == 0:  # gone before the handshake
                raw.close()
                continue
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            if i % 3 == 1:  # a whole request, gone before the reply
                tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
            else:  # half a request, then an abrupt close
                tls.sendall(b"GET /metr")
            tls.close()
        time.sleep(1.0)
        assert "safety_monitor_requests_total" in https_get(
            f"https://localhost:{server.metrics_port}/metrics", str(ca.pem)
        )
    finally:
        assert server.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "SSLEOFError" not in log.replace("SSLEOFError(", ""), log[-3000:]


def _wait_https(port: int, ca: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            https_get(f"https://localhost:{port}/metrics", ca)
            return
        except (OSError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_replaced_client_ca_stops_trusting_the_old_one_on_metrics(tmp_path: Path) -> None:
    old_ca, new_ca = TestCA(tmp_path, "old"), TestCA(tmp_path, "new")
    srv = old_ca.issue("sidecar", server=True)
    old_client, new_client = old_ca.issue("scraper-old", server=False), new_ca.issue("scraper-new", server=False)
    client_ca = tmp_path / "client-ca.pem"
    shutil.copy(old_ca.pem, client_ca)
    st = ServerThread(config(tls_cert=srv.cert, tls_key=srv.key, tls_client_ca=str(client_ca)))
    url = f"https://localhost:{st.server.metrics_port}/metrics"
    try:
        assert "safety_monitor_requests_total" in https_get(url, str(old_ca.pem), (old_client.cert, old_client.key))
        time.sleep(0.05)  # a new mtime even on coarse-timestamp file systems
        shutil.copy(new_ca.pem, client_ca)
        deadline = time.monotonic() + 20  # the 2 s watch interval plus slack
        while True:
            try:
                https_get(url, str(old_ca.pem), (new_client.cert, new_client.key))
                break
            except (urllib.error.URLError, ssl.SSLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            https_get(url, str(old_ca.pem), (old_client.cert, old_client.key))
    finally:
        st.stop()


def test_metrics_auth_requires_the_bearer_token_and_counts_refusals() -> None:
    st = ServerThread(config(metrics_auth="m3trics", auth_token="grpc-token"))
    url = f"http://127.0.0.1:{st.server.metrics_port}/metrics"
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic m3trics"}):
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert err.value.code == 401
            assert err.value.headers["WWW-Authenticate"] == 'Bearer realm="metrics"'
        ok = urllib.request.Request(url, headers={"Authorization": "bearer m3trics"})
        text = urllib.request.urlopen(ok, timeout=10).read().decode()
        assert 'safety_monitor_metrics_rejected_total{reason="unauthorized"} 3.0' in text
        with pytest.raises(urllib.error.HTTPError):  # the gRPC token is not the metrics token
            urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": "Bearer grpc-token"}))
    finally:
        st.stop()


def test_without_metrics_auth_metrics_stay_open_even_with_a_grpc_token() -> None:
    """The documented choice: auth_token protects gRPC only; /metrics needs metrics_auth."""
    st = ServerThread(config(auth_token="grpc-token"))
    try:
        m = st.metrics()
        assert sample(m, "safety_monitor_metrics_rejected_total", reason="unauthorized") == 0
        assert any(k[0] == "safety_monitor_build_info" for k in m)
    finally:
        st.stop()
