"""TLS and mutual TLS on gRPC and /metrics, with certificates generated here and rotated live."""

from __future__ import annotations

import ssl
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.client import Generation, MonitorClient, Unauthenticated, Unavailable
from tests.certs import TestCA
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, config, sample


def gen(rid: str) -> Generation:
    return Generation(rid, MODEL, output="ok", activations={HOOK: np.ones((2, D_MODEL), np.float32)})


def https_get(url: str, ca: str, cert: tuple[str, str] | None = None) -> str:
    ctx = ssl.create_default_context(cafile=ca)
    if cert is not None:
        ctx.load_cert_chain(*cert)
    return urllib.request.urlopen(url, timeout=10, context=ctx).read().decode()


def test_tls_server_accepts_clients_that_trust_it_and_only_them(tmp_path: Path) -> None:
    ca, other = TestCA(tmp_path, "main"), TestCA(tmp_path, "other")
    srv = ca.issue("sidecar", server=True)
    st = ServerThread(config(tls_cert=srv.cert, tls_key=srv.key))
    try:
        with MonitorClient(st.target, tls_ca=str(ca.pem), timeout=5) as ok:
            assert ok.score(gen("tls-1")).request_id == "tls-1"
        with MonitorClient(st.target, timeout=3) as plain, pytest.raises(Unavailable):
            plain.score(gen("plain"))
        with MonitorClient(st.target, tls_ca=str(other.pem), timeout=3) as wrong, pytest.raises(Unavailable):
            wrong.score(gen("wrong-ca"))
        url = f"https://localhost:{st.server.metrics_port}/metrics"
        assert "safety_monitor_requests_total" in https_get(url, str(ca.pem))
        with pytest.raises((urllib.error.URLError, ConnectionError)):
            urllib.request.urlopen(f"http://localhost:{st.server.metrics_port}/metrics", timeout=5).read()
    finally:
        st.stop()


def test_mutual_tls_needs_a_client_certificate_from_the_ca_and_the_token_still_applies(tmp_path: Path) -> None:
    ca, other = TestCA(tmp_path, "main"), TestCA(tmp_path, "other")
    srv = ca.issue("sidecar", server=True)
    good, rogue = ca.issue("inference", server=False), other.issue("rogue", server=False)
    st = ServerThread(config(tls_cert=srv.cert, tls_key=srv.key, tls_client_ca=str(ca.pem), auth_token="s3cret"))
    try:
        kw = {"tls_ca": str(ca.pem), "timeout": 5.0}
        with MonitorClient(st.target, token="s3cret", tls_cert=good.cert, tls_key=good.key, **kw) as ok:
            assert ok.score(gen("mtls-1")).request_id == "mtls-1"
        with MonitorClient(st.target, token="s3cret", **kw) as anon, pytest.raises(Unavailable):
            anon.score(gen("no-cert"))
        rogue_kw = {"tls_cert": rogue.cert, "tls_key": rogue.key, **kw}
        with MonitorClient(st.target, token="s3cret", **rogue_kw) as bad, pytest.raises(Unavailable):  # type: ignore[arg-type]
            bad.score(gen("rogue-cert"))
        good_kw = {"tls_cert": good.cert, "tls_key": good.key, **kw}
        with MonitorClient(st.target, token="wrong", **good_kw) as c, pytest.raises(Unauthenticated):  # type: ignore[arg-type]
            c.score(gen("wrong-token"))
        url = f"https://localhost:{st.server.metrics_port}/metrics"
        m_text = https_get(url, str(ca.pem), (good.cert, good.key))
        assert "safety_monitor_requests_total" in m_text
        with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
            https_get(url, str(ca.pem))  # no client certificate
        m = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(m_text)
            for s in fam.samples
        }
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="OK") == 1
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="UNAUTHENTICATED") == 1
    finally:
        st.stop()


def test_a_rotated_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    old_ca, new_ca = TestCA(tmp_path, "old"), TestCA(tmp_path, "new")
    srv = old_ca.issue("sidecar", server=True, into="server")
    st = ServerThread(config(tls_cert=srv.cert, tls_key=srv.key))
    try:
        with MonitorClient(st.target, tls_ca=str(new_ca.pem), timeout=3) as c, pytest.raises(Unavailable):
            c.score(gen("before"))
        time.sleep(0.05)  # a new mtime even on coarse-timestamp file systems
        new_ca.issue("sidecar", server=True, into="server")  # same paths, new certificate
        deadline = time.monotonic() + 10
        while True:  # gRPC: the next handshake loads it; /metrics: within the 2 s watch interval
            try:
                with MonitorClient(st.target, tls_ca=str(new_ca.pem), timeout=3) as c:
                    assert c.score(gen("after")).request_id == "after"
                https_get(f"https://localhost:{st.server.metrics_port}/metrics", str(new_ca.pem))
                break
            except (Unavailable, urllib.error.URLError, ssl.SSLError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        st.stop()
