"""End to end: the reference server (real model) + the sidecar on loopback, over HTTP and gRPC."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from monitor.client import GenerationMonitor, MonitorClient
from monitor.models import load_default_model
from monitor.reference import ReferenceServer, iter_sse
from tests.conftest import HOOK, MODEL, ServerThread, always_firing_bundle, config, free_port, sample

MESSAGES = [{"role": "user", "content": "Name three rivers in Europe."}]


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    return load_default_model()


def post(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=120)


def chat_once(model: tuple[Any, Any], target: str, max_tokens: int, chunk_tokens: int) -> Any:
    """One chat completion through a reference server monitored by the sidecar at ``target``."""
    client = MonitorClient(target, timeout=2)
    mon = GenerationMonitor(
        model[0], client, model_id=MODEL, hook_points=[HOOK], tokenizer=model[1], chunk_tokens=chunk_tokens
    )
    ref = ReferenceServer(model[0], model[1], MODEL, mon, port=0).start()
    try:
        return json.loads(post(ref.url, {"messages": MESSAGES, "max_tokens": max_tokens}).read())
    finally:
        ref.stop()
        client.close()


def audit_line(path: Path, request_id: str, timeout: float = 20) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file():
            for line in path.read_text().splitlines():
                rec = json.loads(line)
                if rec["request_id"] == request_id:
                    return dict(rec)
        time.sleep(0.1)
    raise AssertionError(f"{request_id} never reached the audit log {path}")


@pytest.fixture
def stack(tmp_path: Path, model: tuple[Any, Any]) -> Iterator[tuple[ServerThread, ReferenceServer, Path]]:
    audit = tmp_path / "audit.jsonl"
    sidecar = ServerThread(config(audit_log=str(audit)))
    client = MonitorClient(sidecar.target)
    mon = GenerationMonitor(model[0], client, model_id=MODEL, hook_points=[HOOK], tokenizer=model[1], chunk_tokens=4)
    ref = ReferenceServer(model[0], model[1], MODEL, mon, port=0).start()
    try:
        yield sidecar, ref, audit
    finally:
        ref.stop()
        client.close()
        sidecar.stop()


def test_chat_completion_is_scored_and_audited(stack: tuple[ServerThread, ReferenceServer, Path]) -> None:
    sidecar, ref, audit = stack
    resp = json.loads(post(ref.url, {"messages": MESSAGES, "max_tokens": 16, "top_logprobs": 2}).read())
    choice = resp["choices"][0]
    text = choice["message"]["content"]
    assert text and choice["finish_reason"] in ("stop", "length")
    assert resp["usage"]["completion_tokens"] <= 16
    lps = choice["logprobs"]["content"]
    assert len(lps) == resp["usage"]["completion_tokens"] and all(e["logprob"] <= 0 for e in lps)
    assert len(lps[0]["top_logprobs"]) == 2 and lps[0]["top_logprobs"][0]["logprob"] >= lps[0]["logprob"] - 1e-6
    monitored = resp["safety_monitor"]
    assert monitored["request_id"] == resp["id"] and not monitored["halted"] and not monitored["error"]
    rec = audit_line(audit, resp["id"])
    assert rec["rpc"] == "ScoreStream" and len(rec["detectors"]) == 16
    assert "harmful_compliance" in rec["detectors"]  # the decision row travelled with the first chunk
    assert rec["text_stats"]["output_chars"] == len(text)
    # The record is durable before the metrics of its final chunk are recorded (and the reply
    # that follows them may still be on its way): read the metrics once they count it.
    deadline = time.monotonic() + 10
    m = sidecar.metrics()
    while sample(m, "safety_monitor_generations_scored_total", rpc="ScoreStream") < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
        m = sidecar.metrics()
    assert sample(m, "safety_monitor_generations_scored_total", rpc="ScoreStream") == 1
    assert (
        sample(
            m,
            "safety_monitor_detector_probability_count",
            detector="deceptive_setup.ensemble",
            behaviour="deceptive_setup",
        )
        == 1
    )
    # the response tokens were scored: generated tokens minus the last one (never fed back)
    assert sample(m, "safety_monitor_tokens_scored_total", hook_point=HOOK) == len(lps) - 1


def test_streaming_matches_non_streaming_and_bad_requests_are_named(
    stack: tuple[ServerThread, ReferenceServer, Path],
) -> None:
    _sidecar, ref, _audit = stack
    whole = json.loads(post(ref.url, {"messages": MESSAGES, "max_tokens": 12}).read())
    events = list(iter_sse(post(ref.url, {"messages": MESSAGES, "max_tokens": 12, "stream": True})))
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    streamed = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert streamed == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    for body, param in (
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": MESSAGES, "temperature": 5}, "temperature"),
    ):
        with pytest.raises(urllib.error.HTTPError) as err:
            post(ref.url, body)
        assert err.value.code == 400
        assert json.loads(err.value.read())["error"]["param"] == param
    # the server still serves after bad requests
    assert json.loads(post(ref.url, {"messages": MESSAGES, "max_tokens": 2}).read())["choices"]


def test_halt_advice_stops_generation(tmp_path: Path, model: tuple[Any, Any]) -> None:
    """A bundle whose critical detector fires on anything (threshold -1e9): the sidecar says HALT."""
    bundle = always_firing_bundle(tmp_path)
    sidecar = ServerThread(config(bundle=str(bundle)))
    try:
        resp = chat_once(model, sidecar.target, max_tokens=64, chunk_tokens=2)
    finally:
        sidecar.stop()
    choice = resp["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert resp["safety_monitor"]["halted"] and "harmful_compliance fired" in resp["safety_monitor"]["halt_reason"]
    assert resp["usage"]["completion_tokens"] < 16  # stopped within a few chunks, not at max_tokens


def test_generation_survives_a_sidecar_that_is_down(model: tuple[Any, Any]) -> None:
    resp = chat_once(model, f"127.0.0.1:{free_port()}", max_tokens=8, chunk_tokens=16)
    assert resp["choices"][0]["message"]["content"]
    assert not resp["safety_monitor"]["halted"]


def test_projected_mode_during_generate_gives_the_same_verdict(model: tuple[Any, Any]) -> None:
    sidecar = ServerThread(config())
    client = MonitorClient(sidecar.target)
    try:
        hp = client.get_detectors().hook_points[0]
        assert hp.encoder_slice is not None
        enc = model[1].apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        verdicts = []
        for slices in (None, {hp.name: hp.encoder_slice}):
            mon = GenerationMonitor(
                model[0], client, model_id=MODEL, hook_points=[hp.name], encoder_slices=slices, chunk_tokens=4
            )
            out = mon.generate(
                f"proj-{slices is not None}",
                enc["input_ids"],
                attention_mask=enc["attention_mask"],
                max_new_tokens=12,
                do_sample=False,
            )
            verdicts.append(out.verdict())
        full, projected = verdicts
        assert full is not None and projected is not None
        assert full.tokens_seen == projected.tokens_seen == 11
        a = {d.detector: d.score for d in full.detectors}
        b = {d.detector: d.score for d in projected.detectors}
        assert b == pytest.approx(a, abs=2e-3)
        m = sidecar.metrics()
        # projected chunks carry K values per token instead of 576 (11 tokens + the decision row each)
        assert (
            sample(m, "safety_monitor_received_bytes_total", rpc="ScoreStream")
            == (11 + 1) * (576 + hp.encoder_slice.width) * 4
        )
    finally:
        client.close()
        sidecar.stop()
