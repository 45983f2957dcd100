"""The deploy/ rules and configs: promtool unit tests, and a real Prometheus scraping a real sidecar."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from monitor.client import Generation, MonitorClient
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, always_firing_bundle, config, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def require(tool: str) -> None:
    """Skip loudly when ``tool`` is missing (a warning in pytest's summary); under CI, fail instead."""
    if shutil.which(tool) is not None:
        return
    message = (
        f"{tool} not installed: `make install` installs it where it can (Debian, as root: "
        "apt-get install prometheus prometheus-alertmanager)"
    )
    if os.environ.get("CI"):
        pytest.fail(f"{message}; CI must run the real-Prometheus tests")
    warnings.warn(f"{message}; this real-Prometheus test is SKIPPED", pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


def test_rules_pass_their_promtool_unit_tests() -> None:
    require("promtool")
    check = subprocess.run(
        ["promtool", "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    r = subprocess.run(
        ["promtool", "test", "rules", "tests.yml"], cwd=DEPLOY / "prometheus", capture_output=True, text=True
    )
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_alertmanager_config_is_valid() -> None:
    require("amtool")
    r = subprocess.run(
        ["amtool", "check-config", str(DEPLOY / "alertmanager" / "alertmanager.yml")], capture_output=True, text=True
    )
    assert r.returncode == 0 and "3 receivers" in r.stdout, r.stdout + r.stderr


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[ServerThread, str]]:
    require("prometheus")
    # The critical detector fires on everything, so the fired-ratio rule has a known answer (1.0).
    bundle = always_firing_bundle(tmp_path)
    sidecar = ServerThread(config(drift_reference_events=20, drift_window_events=100, bundle=str(bundle)))
    engine = VllmAdapterCounters()
    for name in ("recording_rules.yml", "alerts.yml"):  # evaluated every second here, every minute in production
        text = (DEPLOY / "prometheus" / name).read_text().replace("interval: 1m", "interval: 1s")
        (tmp_path / name).write_text(text)
    cfg = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": ["recording_rules.yml", "alerts.yml"],
        "scrape_configs": [
            {
                "job_name": "safety-monitor",
                "static_configs": [{"targets": [f"127.0.0.1:{sidecar.server.metrics_port}"]}],
            },
            {"job_name": "vllm", "static_configs": [{"targets": [f"127.0.0.1:{engine.port}"]}]},
        ],
    }
    (tmp_path / "prometheus.yml").write_text(json.dumps(cfg))  # JSON is valid YAML
    port = free_port()
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield sidecar, f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        sidecar.stop()
        engine.stop()


class VllmAdapterCounters:
    """What vLLM's ``/metrics`` shows of the adapter: the ``vllm:safety_monitor_*`` counters with
    vLLM's labels (``MonitorPromMetrics``, checked against vLLM's own metric classes in
    tests/vllm/test_connector.py), served by prometheus_client and advanced every 0.2 s: 9
    requests monitored for each one unmonitored (``stream_refused``), so coverage is 0.9."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, start_http_server

        reg = CollectorRegistry()
        labels = ["model_name", "engine"]
        monitored = Counter("vllm:safety_monitor_requests_monitored", "", labels, registry=reg)
        unmonitored = Counter("vllm:safety_monitor_requests_unmonitored", "", [*labels, "reason"], registry=reg)
        dropped = Counter("vllm:safety_monitor_rows_dropped", "", [*labels, "reason"], registry=reg)
        self.port = free_port()
        self._server, self._thread = start_http_server(self.port, addr="127.0.0.1", registry=reg)
        self._stop = threading.Event()

        def tick() -> None:
            while not self._stop.wait(0.2):
                monitored.labels(MODEL, "0").inc(9)
                unmonitored.labels(MODEL, "0", "stream_refused").inc(1)
                dropped.labels(MODEL, "0", "queue_full").inc(4)

        self._ticker = threading.Thread(target=tick, daemon=True)
        self._ticker.start()

    def stop(self) -> None:
        self._stop.set()
        self._server.shutdown()


def query(base: str, expr: str) -> list[dict[str, object]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except OSError:
        return []
    return list(doc["data"]["result"]) if doc.get("status") == "success" else []


def query_status(base: str, expr: str) -> tuple[str, str]:
    """(status, error) of an instant query: a query Prometheus cannot parse or run is an 'error'."""
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        doc = json.loads(urllib.request.urlopen(url, timeout=5).read())
    except urllib.error.HTTPError as exc:
        doc = json.loads(exc.read())
    return str(doc.get("status")), str(doc.get("error", ""))


def dashboard_queries() -> list[tuple[str, str]]:
    dash = json.loads((DEPLOY / "grafana" / "dashboards" / "safety-monitor.json").read_text())
    return [(panel["title"], t["expr"]) for panel in dash["panels"] for t in panel["targets"]]


# Panels whose data needs what this test does not produce (a day of history, critiques, debates,
# shed or invalid requests, a change point, a streamed HALT, an OTLP endpoint); their queries must
# still parse and run.
MAY_BE_EMPTY = ("vs yesterday", "Critique", "Shed and invalid", "Change points", "HALTs by", "Debate", "OTel")


def wait_for(base: str, expr: str, timeout: float = 60) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = query(base, expr)
        if result:
            return result
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never returned data for {expr}")


def test_real_prometheus_computes_the_fleet_rules_from_a_real_sidecar(prometheus: tuple[ServerThread, str]) -> None:
    sidecar, base = prometheus
    rng = np.random.default_rng(0)
    acts = np.ones((2, D_MODEL), np.float32)
    fired_on: dict[str, int] = {}
    with MonitorClient(sidecar.target) as client:

        def send(n: int, low: int, high: int, start: int) -> None:
            for i in range(start, start + n):
                words = " ".join(["word"] * int(rng.integers(low, high)))
                reply = client.score(Generation(f"p{i}", MODEL, "Q?", words + ".", {HOOK: acts}))
                for d in reply.detectors:
                    fired_on[d.detector] = fired_on.get(d.detector, 0) + int(d.fired)

        wait_for(base, 'up{job="safety-monitor"} == 1')
        deadline = time.monotonic() + 60
        found: list[dict[str, object]] = []
        sent = 0
        while time.monotonic() < deadline and not found:  # keep traffic flowing while rates fill in
            send(10, 40, 60, sent)
            sent += 10
            time.sleep(0.5)
            found = query(base, 'stat:safety_monitor_text_statistic:mean5m{stat="words"}')
        mean = float(found[0]["value"][1])  # type: ignore[index]
        assert 40 <= mean <= 60  # what was sent: 40..59 words per response
        p50 = wait_for(base, 'stat:safety_monitor_text_statistic:p50_1h{stat="words"}')
        assert 30 <= float(p50[0]["value"][1]) <= 75  # type: ignore[index]  # bucket-interpolated median
        # The activations are the same every time, so each detector fired on all generations (the
        # critical ones at least) or on none: the fleet ratio is 1 for the first and absent for the rest.
        always = {name for name, n in fired_on.items() if n == sent}
        assert always and set(fired_on.values()) <= {0, sent}, fired_on
        ratios = wait_for(base, "detector:safety_monitor_detector_fired:ratio5m")
        # (rate() extrapolates each series from its own first sample: a fraction of a per cent apart)
        got = {r["metric"]["detector"]: float(r["value"][1]) for r in ratios}  # type: ignore[index]
        assert set(got) == always and all(abs(v - 1.0) < 0.01 for v in got.values()), got
        # Same lengths so far: no drift alarm. Then four times longer responses fill the current
        # window: the worst replica's PSI must cross the 0.25 alarm level and the alarm rule count it.
        assert query(base, 'metric:safety_monitor_drift_alarm:replicas{metric="text.words"} > 0') == []
        send(120, 200, 240, sent)
    psi = wait_for(base, 'metric:safety_monitor_drift_psi:max{metric="text.words"} >= 0.25')
    assert float(psi[0]["value"][1]) >= 0.25  # type: ignore[index]
    assert wait_for(base, 'metric:safety_monitor_drift_alarm:replicas{metric="text.words"} == 1')
    # every query of the shipped Grafana dashboard runs on this real Prometheus, and returns data
    # where the traffic above produces some
    coverage = next(e for t, e in dashboard_queries() if t.startswith("vLLM monitoring coverage"))
    got = wait_for(base, coverage)
    assert abs(float(got[0]["value"][1]) - 0.9) < 1e-6, got  # type: ignore[index]
    for title, expr in dashboard_queries():
        status, error = query_status(base, expr)
        assert status == "success", f"{title}: {expr}: {error}"
        if not any(k in title for k in MAY_BE_EMPTY):
            assert wait_for(base, expr, timeout=30), f"{title}: no data for {expr}"


def test_deploy_files_hang_together() -> None:
    import yaml

    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"sidecar", "prometheus", "alertmanager", "grafana"}
    for service in compose["services"].values():  # every mounted file or folder exists
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), source
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    dash = json.loads((DEPLOY / "grafana/dashboards/safety-monitor.json").read_text())
    assert {t["datasource"]["uid"] for p in dash["panels"] for t in p["targets"]} == {uid}
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    k8s = next(yaml.safe_load_all((DEPLOY / "k8s/sidecar.yaml").read_text()))
    containers = k8s["spec"]["template"]["spec"]["containers"]
    sidecar = next(c for c in containers if c["name"] == "safety-monitor")
    assert {p["containerPort"] for p in sidecar["ports"]} == {50051, 9464}
    assert k8s["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 30  # > drain_seconds
