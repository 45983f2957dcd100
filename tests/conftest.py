"""Shared fixtures: a real sidecar on 127.0.0.1 in a background event loop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import ServerConfig
from monitor.detectors import default_bundle_path
from monitor.server import BackgroundSidecar

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOOK = "blocks.16.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
D_MODEL = 576


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread(BackgroundSidecar):
    """The real sidecar on a background loop, plus a /metrics scraper for assertions."""

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics over HTTP and parse it with prometheus_client's parser."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


def wait_serving(target: str, timeout: float = 60, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Block until the gRPC health service at ``target`` reports SERVING."""
    deadline = time.monotonic() + timeout
    ch = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    with ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                if (
                    stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    == health_pb2.HealthCheckResponse.SERVING
                ):
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {target} never reported SERVING")
            time.sleep(0.1)


class ServeProcess:
    """``monitor serve`` in its own process (for SIGKILL, RSS and log checks)."""

    def __init__(self, *args: str, log_path: Path | None = None, env: dict[str, str] | None = None) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "monitor", "serve", "--port", str(self.port)]
        cmd += ["--metrics-port", str(self.metrics_port), *args]
        self.log_path = log_path
        out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
        self.target = f"127.0.0.1:{self.port}"

    def wait(self, credentials: grpc.ChannelCredentials | None = None) -> ServeProcess:
        wait_serving(self.target, credentials=credentials)
        return self

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("VmRSS not found")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)


def sample(metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def config(**overrides: Any) -> ServerConfig:
    base: dict[str, Any] = {"port": 0, "metrics_port": 0, "drain_seconds": 2.0}
    base.update(overrides)
    return ServerConfig(**base)


@pytest.fixture
def sidecar() -> Iterator[ServerThread]:
    st = ServerThread(config())
    yield st
    st.stop()


def always_firing_bundle(folder: Path) -> Path:
    """A copy of the default bundle whose critical detector fires on anything (threshold -1e9)."""
    bundle = folder / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    manifest = yaml.safe_load((bundle / "bundle.yaml").read_text())
    for d in manifest["detectors"]:
        if d["critical"]:
            d["threshold"] = -1e9
    (bundle / "bundle.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    return bundle
