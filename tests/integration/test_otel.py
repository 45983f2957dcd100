"""OpenTelemetry end to end: the sidecar's verdicts reach a real OTLP/gRPC receiver (built on the
official ``opentelemetry-proto`` LogsService) as ``gen_ai.evaluation.result`` events, with the
trace context the generation arrived with; the same trace is an exemplar on ``/metrics``.

Each test starts its own receiver and sidecar on loopback ports they pick.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from monitor._proto import monitor_pb2_grpc
from monitor.client import Generation, GenerationMonitor, MonitorClient
from monitor.client._wire import request as wire_request
from monitor.harness.otlp import OtlpReceiver, Received
from monitor.models import load_default_model
from monitor.reference import ReferenceServer
from monitor.telemetry import SCHEMA_URL
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, always_firing_bundle, config, sample

pytestmark = pytest.mark.integration

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"
META_TRACE, META_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as rx:
        yield rx


def generation(request_id: str, seed: int, traceparent: str = "") -> Generation:
    rng = np.random.default_rng(seed)
    rows = rng.normal(size=(12, D_MODEL)).astype(np.float32)
    decision = rng.normal(size=(1, D_MODEL)).astype(np.float32)
    return Generation(
        request_id, MODEL, "a prompt", "an answer", {HOOK: rows}, decision={HOOK: decision}, traceparent=traceparent
    )


def events_of(records: list[Received], request_id: str) -> dict[str, Received]:
    return {
        str(r.attributes["gen_ai.evaluation.name"]): r
        for r in records
        if r.attributes.get("gen_ai.response.id") == request_id
    }


def test_score_verdicts_arrive_as_evaluation_events_with_their_trace(receiver: OtlpReceiver) -> None:
    sidecar = ServerThread(config(otlp_endpoint=receiver.endpoint))
    try:
        with MonitorClient(sidecar.target) as client:
            reply = client.score(generation("otel-field", 1, TRACEPARENT))
            client.score(generation("otel-field", 1, TRACEPARENT))  # a retry: acknowledged once, emitted once
            bad = client.score(generation("otel-malformed", 2, "00-not-a-trace-01"))
        # The call's traceparent metadata (what OpenTelemetry's gRPC instrumentation sends).
        with grpc.insecure_channel(sidecar.target) as channel:
            stub = monitor_pb2_grpc.SafetyMonitorStub(channel)
            meta = stub.Score(
                wire_request(generation("otel-metadata", 3)),
                metadata=(("traceparent", f"00-{META_TRACE}-{META_SPAN}-01"),),
                timeout=10,
            )
        n = len(reply.detectors) + len(bad.detectors) + len(meta.detectors)
        assert len(reply.detectors) >= 9  # response and prompt detectors all reported
        records = receiver.wait_for(n)
        metrics = sidecar.metrics()
    finally:
        sidecar.stop()
    time.sleep(1.5)  # a second copy of the retried generation's events would have come by now
    records = receiver.records
    assert len(records) == n
    mine = events_of(records, "otel-field")
    assert set(mine) == {d.detector for d in reply.detectors}
    for d in reply.detectors:
        e = mine[d.detector]
        assert e.event_name == "gen_ai.evaluation.result"
        assert e.attributes["gen_ai.evaluation.score.value"] == pytest.approx(d.probability, abs=1e-12)
        assert e.attributes["gen_ai.evaluation.score.label"] == ("fired" if d.fired else "not_fired")
        assert e.attributes["safety_monitor.score"] == pytest.approx(d.score, abs=1e-12)
        assert e.attributes["gen_ai.request.model"] == MODEL
        assert (e.trace_id, e.span_id) == (TRACE, SPAN)
        assert e.severity_text == ("WARN" if d.fired and d.critical else "INFO")
        assert e.resource["service.name"] == "safety-monitor" and e.schema_url == SCHEMA_URL
        if d.top_features:  # SAE probes explain themselves with their top latents' labels
            assert f"latent {d.top_features[0].latent} " in str(e.attributes["gen_ai.evaluation.explanation"])
    assert {(e.trace_id, e.span_id) for e in events_of(records, "otel-metadata").values()} == {(META_TRACE, META_SPAN)}
    # A malformed traceparent costs the trace, never the verdict: scored, exported, counted.
    assert {(e.trace_id, e.span_id) for e in events_of(records, "otel-malformed").values()} == {("", "")}
    assert sample(metrics, "safety_monitor_trace_context_invalid_total", source="field") == 1
    assert sample(metrics, "safety_monitor_otel_events_total", outcome="emitted") == n
    assert sample(metrics, "safety_monitor_otel_events_total", outcome="dropped") == 0


def openmetrics(port: int) -> str:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    return urllib.request.urlopen(req, timeout=10).read().decode()


def test_a_traceparent_sent_to_the_reference_server_reaches_events_halt_and_exemplars(
    tmp_path: Path, receiver: OtlpReceiver
) -> None:
    """HTTP header -> reference server -> GenerationMonitor -> ScoreStream -> sidecar: the detector
    events, the HALT event and the /metrics exemplars (OpenMetrics) all carry the request's trace."""
    model = load_default_model()
    sidecar = ServerThread(config(bundle=str(always_firing_bundle(tmp_path)), otlp_endpoint=receiver.endpoint))
    client = MonitorClient(sidecar.target, timeout=5)
    mon = GenerationMonitor(model[0], client, model_id=MODEL, hook_points=[HOOK], tokenizer=model[1], chunk_tokens=2)
    ref = ReferenceServer(model[0], model[1], MODEL, mon, port=0).start()
    try:
        body = {"messages": [{"role": "user", "content": "Name three rivers in Europe."}], "max_tokens": 32}
        req = urllib.request.Request(
            f"{ref.url}/v1/chat/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json", "traceparent": TRACEPARENT},
        )
        resp: dict[str, Any] = json.loads(urllib.request.urlopen(req, timeout=120).read())
        assert resp["choices"][0]["finish_reason"] == "content_filter"
        deadline = time.monotonic() + 20
        mine: dict[str, Received] = {}
        while time.monotonic() < deadline and not ("safety_monitor.halt" in mine and len(mine) > 9):
            mine = events_of(receiver.records, resp["id"])
            time.sleep(0.1)
        exposition = openmetrics(sidecar.server.metrics_port)
    finally:
        ref.stop()
        client.close()
        sidecar.stop()
    halt = mine.pop("safety_monitor.halt")
    assert halt.attributes["gen_ai.evaluation.score.label"] == "halt"
    assert "harmful_compliance" in str(halt.attributes["safety_monitor.detectors"])
    assert (halt.trace_id, halt.span_id) == (TRACE, SPAN) and halt.severity_text == "WARN"
    assert len(mine) >= 9 and {(e.trace_id, e.span_id) for e in mine.values()} == {(TRACE, SPAN)}
    exemplar = f'# {{span_id="{SPAN}",trace_id="{TRACE}"}}'
    lines = [x for x in exposition.splitlines() if exemplar in x]
    assert any(x.startswith("safety_monitor_detector_probability_bucket") for x in lines), lines
    assert any(x.startswith("safety_monitor_pipeline_duration_seconds_bucket") for x in lines), lines
    assert any(x.startswith("safety_monitor_request_duration_seconds_bucket") for x in lines), lines
    assert any(x.startswith('safety_monitor_halts_by_detector_total{detector="harmful_compliance') for x in lines)


def test_otlp_endpoint_misconfigured_is_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "monitor", "serve", "--port", "0", "--otlp-endpoint", "127.0.0.1:4317"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "otlp_endpoint" in lines[0] and "http://HOST:PORT" in lines[0], proc.stderr
