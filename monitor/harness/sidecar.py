"""``monitor serve`` as a child process: for benches, kill -9 tests and anything that must
measure or kill the sidecar apart from the caller (its RSS, its log, its crash)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["SidecarProcess", "free_port", "wait_serving"]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float = 60, credentials: grpc.ChannelCredentials | None = None) -> None:
    """Block until the gRPC health service at ``target`` reports SERVING."""
    deadline = time.monotonic() + timeout
    ch = grpc.secure_channel(target, credentials) if credentials is not None else grpc.insecure_channel(target)
    with ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"server at {target} never reported SERVING")
            time.sleep(0.1)


class SidecarProcess:
    """``python -m monitor serve`` on free loopback ports, with extra flags and environment."""

    def __init__(
        self, *args: str, log_path: Path | None = None, env: dict[str, str] | None = None, port: int | None = None
    ) -> None:
        # ``port``: a fixed one, e.g. to restart a killed sidecar where its clients expect it
        self.port, self.metrics_port = port or free_port(), free_port()
        cmd = [sys.executable, "-m", "monitor", "serve", "--port", str(self.port)]
        cmd += ["--metrics-port", str(self.metrics_port), *args]
        self.log_path = log_path
        out = log_path.open("ab") if log_path is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
        )
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"

    def wait(self, timeout: float = 120, credentials: grpc.ChannelCredentials | None = None) -> SidecarProcess:
        """Return once it serves (raises ``TimeoutError`` naming the target otherwise)."""
        wait_serving(self.target, timeout, credentials)
        return self

    def rss_kib(self) -> int:
        """Resident memory of the sidecar process (Linux /proc), in KiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"VmRSS not found for pid {self.proc.pid}")

    def kill9(self) -> None:
        """SIGKILL: no drain, no final save (what a crash or an OOM kill looks like)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> int:
        """SIGTERM (drain, save), then the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(30)
