"""Fleet scale with existing engines: two sidecars, each scraped by its own Prometheus in agent
mode (deploy/prometheus/agent.yml) that remote-writes to a central Prometheus with the
remote-write receiver on (deploy/prometheus/central.yml), which evaluates the shipped recording
rules and alerts. The central store answers the fleet rules' series for both sidecars.

All real: Prometheus 2.42 (Debian) three times, two ``monitor serve`` sidecars on loopback.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from monitor.client import Generation, MonitorClient
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, always_firing_bundle, config, free_port
from tests.integration.test_prometheus_rules import DEPLOY, query, require, wait_for

pytestmark = pytest.mark.integration


def prometheus(args: list[str], work: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        ["prometheus", *args, f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(work / f"prometheus-{port}.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[list[ServerThread], str]]:
    require("prometheus")
    bundle = always_firing_bundle(tmp_path)  # the critical detector fires on everything: ratio 1.0
    sidecars = [ServerThread(config(bundle=str(bundle))) for _ in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        central = tmp_path / "central"
        central.mkdir()
        for name in ("recording_rules.yml", "alerts.yml"):  # every second here, every minute in production
            text = (DEPLOY / "prometheus" / name).read_text().replace("interval: 1m", "interval: 1s")
            (central / name).write_text(text)
        cfg = yaml.safe_load((DEPLOY / "prometheus" / "central.yml").read_text())
        cfg["global"]["evaluation_interval"] = "1s"
        cfg.pop("alerting")  # no Alertmanager here: the alerts are still evaluated
        (central / "central.yml").write_text(yaml.safe_dump(cfg))
        proc, base = prometheus(
            [
                f"--config.file={central / 'central.yml'}",
                f"--storage.tsdb.path={central / 'data'}",
                "--web.enable-remote-write-receiver",
            ],
            tmp_path,
        )
        procs.append(proc)
        for i, sidecar in enumerate(sidecars):
            agent = tmp_path / f"agent-{i}"
            agent.mkdir()
            cfg = yaml.safe_load((DEPLOY / "prometheus" / "agent.yml").read_text())
            cfg["global"]["scrape_interval"] = "1s"
            cfg["global"]["external_labels"]["replica"] = f"pod-{i}"
            cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{sidecar.server.metrics_port}"]
            cfg["remote_write"][0]["url"] = f"{base}/api/v1/write"
            cfg["remote_write"][0]["queue_config"]["batch_send_deadline"] = "1s"
            (agent / "agent.yml").write_text(yaml.safe_dump(cfg))
            proc, _ = prometheus(
                [
                    "--enable-feature=agent",
                    f"--config.file={agent / 'agent.yml'}",
                    f"--storage.agent.path={agent / 'data'}",
                ],
                tmp_path,
            )
            procs.append(proc)
        yield sidecars, base
    finally:
        for proc in reversed(procs):  # the agents first: they flush to the central store on the way out
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for s in sidecars:
            s.stop()


def exposition(sidecar: ServerThread) -> str:
    url = f"http://127.0.0.1:{sidecar.server.metrics_port}/metrics"
    return str(urllib.request.urlopen(url, timeout=10).read().decode())


def test_central_prometheus_answers_the_fleet_rules_for_two_agent_scraped_sidecars(
    fleet: tuple[list[ServerThread], str],
) -> None:
    sidecars, base = fleet
    acts = np.ones((2, D_MODEL), np.float32)
    words = {0: 20, 1: 60}  # replica 0 answers 20 words, replica 1 60: the fleet mean is 40
    clients = [MonitorClient(s.target) for s in sidecars]
    try:
        wait_for(base, 'count(up{job="safety-monitor"} == 1) == 2')
        deadline = time.monotonic() + 90
        mean: list[dict[str, Any]] = []
        sent = 0
        while time.monotonic() < deadline:  # traffic keeps flowing while the rates fill in
            for i, client in enumerate(clients):
                for k in range(5):
                    text = " ".join(["word"] * words[i]) + "."
                    client.score(Generation(f"r{i}-{sent + k}", MODEL, "Q?", text, {HOOK: acts}))
            sent += 5
            time.sleep(0.3)
            mean = query(base, 'stat:safety_monitor_text_statistic:mean5m{stat="words"}')
            per_replica = query(base, "count by (replica) (safety_monitor_generations_scored_total)")
            if mean and len(per_replica) == 2 and 35 <= float(mean[0]["value"][1]) <= 45:  # type: ignore[index]
                break
        assert mean, "the central store never computed the fleet mean"
        assert sorted(r["metric"]["replica"] for r in per_replica) == ["pod-0", "pod-1"]  # type: ignore[index]
        assert 35 <= float(mean[0]["value"][1]) <= 45, mean  # type: ignore[index]  # both replicas in it
        ratios = wait_for(base, "detector:safety_monitor_detector_fired:ratio5m")
        # the activations are the same every time: a detector fires on every generation or on none,
        # on both replicas alike, so every fleet ratio present is 1 (up to rate()'s extrapolation of
        # each series from its own first sample, a few per cent over the first minute: 1.024 seen)
        got = {r["metric"]["detector"]: float(r["value"][1]) for r in ratios}  # type: ignore[index]
        assert got and all(abs(v - 1.0) < 0.05 for v in got.values()), got
        # the alert rules run centrally too (none fires on this traffic, but each is loaded and healthy)
        rules = json.loads(urllib.request.urlopen(f"{base}/api/v1/rules", timeout=5).read())["data"]["groups"]
        health = {r["name"]: r["health"] for g in rules for r in g["rules"]}
        assert len(health) >= 9 and set(health.values()) == {"ok"}, health
        # What one replica costs the central store (docs/scale-out.md).
        text = exposition(sidecars[0])
        series = [x for x in text.splitlines() if x and not x.startswith("#")]
        stored = query(base, 'count({replica="pod-0"})')
        print(
            f"\nper replica: {len(series)} series in its scrape, {len(text.encode())} bytes per scrape; "
            f"central store holds {stored[0]['value'][1]} series of pod-0"  # type: ignore[index]
        )
    finally:
        for c in clients:
            c.close()
