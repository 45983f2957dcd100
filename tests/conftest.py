"""Shared fixtures: a real sidecar on 127.0.0.1 in a background event loop."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import ServerConfig
from monitor.server import SidecarServer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOOK = "blocks.16.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
D_MODEL = 576


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerThread:
    """Runs a ``SidecarServer`` on its own event loop thread; ``stop()`` drains and joins."""

    def __init__(self, config: ServerConfig) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = SidecarServer(config)
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(30)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def call(self, coro: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Scrape /metrics over HTTP and parse it with prometheus_client's parser."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


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
