"""Shared fixtures: a real sidecar on 127.0.0.1 in a background event loop."""

from __future__ import annotations

import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from monitor.config import ServerConfig
from monitor.detectors import default_bundle_path
from monitor.harness.sidecar import free_port as free_port
from monitor.harness.sidecar import wait_serving as wait_serving
from monitor.harness.vllm import find_vllm_python
from monitor.server import BackgroundSidecar
from monitor.server import SidecarProcess as ServeProcess  # noqa: F401 (re-exported for tests)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HOOK = "blocks.16.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
D_MODEL = 576


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


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """Python of vLLM's environment (.venv-vllm); tests that need it skip, with the reason, without it."""
    try:
        return find_vllm_python()
    except FileNotFoundError as exc:
        pytest.skip(f"vLLM environment missing: {exc}")
