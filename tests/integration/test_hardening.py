"""A hostile client against the real server on 127.0.0.1: bad bytes, abandoned and idle streams,
hostile numbers, auth edge cases. Every answer must be a designed status, counted."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import grpc
import numpy as np
import pytest

from monitor._proto import monitor_pb2 as pb
from monitor.client import Generation, MonitorClient
from monitor.critique import Critic, CritiqueEvent, CritiquePolicy, CritiqueService, OpenAIChatBackend
from monitor.metrics import MonitorMetrics
from tests.conftest import D_MODEL, HOOK, MODEL, ServeProcess, ServerThread, config, sample

REPO = Path(__file__).resolve().parents[2]
SERVICE = "/safety_monitor.v1.SafetyMonitor/"


def _fuzz_module():  # scripts/ is not a package: load the fuzzer the docs' run used
    spec = importlib.util.spec_from_file_location("fuzz_server", REPO / "scripts" / "fuzz_server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _raw(ch: grpc.Channel, kind: str, rpc: str):  # type: ignore[no-untyped-def]
    ident = lambda b: b  # noqa: E731
    return getattr(ch, kind)(SERVICE + rpc, request_serializer=ident, response_deserializer=ident)


def request(rid: str, n: int = 3, fill: float | None = None) -> pb.ScoreRequest:
    if fill is None:
        x = np.random.default_rng(0).normal(size=(n, D_MODEL)).astype(np.float32)
    else:
        x = np.full((n, D_MODEL), fill, np.float32)
    t = pb.Tensor(shape=[n, D_MODEL], dtype=pb.DTYPE_F32, data=x.tobytes())
    return pb.ScoreRequest(
        request_id=rid, model=MODEL, output="ok", activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)]
    )


def with_bad_utf8_prompt(msg: pb.ScoreRequest) -> bytes:
    """``msg`` plus a prompt field (3) holding invalid UTF-8, written by hand (protobuf refuses)."""
    return msg.SerializeToString() + b"\x1a\x02\xc3\x28"


def test_seeded_fuzz_sample_gets_only_designed_codes_all_counted(tmp_path: Path) -> None:
    fuzz = _fuzz_module()
    st = ServerThread(config(audit_log=str(tmp_path / "audit.jsonl"), auth_token="s3cret"))
    try:
        client = fuzz.fuzz(st.target, 1500, seed=11, workers=4, token="s3cret")
        metrics = st.metrics()
    finally:
        st.stop()
    outside = {k: v for k, v in client.items() if k[1] not in fuzz.ALLOWED}
    assert outside == {}
    assert sum(client.values()) == 1501  # 1500 + the catalog call
    counted = {
        (rpc, code): sample(metrics, "safety_monitor_requests_total", rpc=rpc, code=code)
        for rpc in ("Score", "ScoreStream", "Ingest", "GetDetectors")
        for code in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "CANCELLED")
    }
    # A stream whose mutated bytes lost final=true ends without its final chunk: the client saw
    # OK (it half-closed), the server counts an abandoned generation as CANCELLED.
    counted[("ScoreStream", "OK")] += counted.pop(("ScoreStream", "CANCELLED"))
    for key, n in counted.items():  # the server counted every call, with the code the client saw
        assert n == client.get(key, 0), key
    assert client[("Score", "INVALID_ARGUMENT")] > 300 and client[("Score", "OK")] > 50
    assert client[("Score", "UNAUTHENTICATED")] > 20


def test_bad_utf8_is_invalid_argument_naming_the_field(sidecar: ServerThread) -> None:
    with grpc.insecure_channel(sidecar.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            _raw(ch, "unary_unary", "Score")(with_bad_utf8_prompt(request("u1")), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("prompt: expected a valid safety_monitor.v1.ScoreRequest")
        assert "invalid UTF-8" in err.value.details()
        bad_label = request("u2").SerializeToString() + b"\x32\x07\x0a\x01\xff\x12\x02ok"  # labels key 0xff
        with pytest.raises(grpc.RpcError) as err:
            _raw(ch, "unary_unary", "Score")(bad_label, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "labels.key" in err.value.details()
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_requests_total", rpc="Score", code="INVALID_ARGUMENT") == 2
    assert sample(m, "safety_monitor_invalid_inputs_total", rpc="Score", reason="malformed") == 2


def test_ingest_rejects_bad_items_one_by_one_and_keeps_the_rest(tmp_path: Path) -> None:
    audit = tmp_path / "audit.jsonl"
    st = ServerThread(config(audit_log=str(audit)))
    try:
        items = [
            request("good-0").SerializeToString(),
            with_bad_utf8_prompt(request("bad-1")),
            b"\xff\xff\xff",
            request("huge-3", fill=3e38).SerializeToString(),
            request("zero-4", n=0).SerializeToString(),
            request("good-5").SerializeToString(),
        ]
        with grpc.insecure_channel(st.target) as ch:
            summary = pb.IngestSummary.FromString(_raw(ch, "stream_unary", "Ingest")(iter(items), timeout=20))
        assert (summary.received, summary.accepted, summary.rejected) == (6, 2, 4)
        assert [e.index for e in summary.errors] == [1, 2, 3, 4]
        assert "prompt" in summary.errors[0].message and "invalid UTF-8" in summary.errors[0].message
        assert "|x| <= 1e+06" in summary.errors[2].message
        assert "at least 1 token" in summary.errors[3].message
        # acknowledged means on disk: the records are there the moment the summary arrives
        ids = [json.loads(line)["request_id"] for line in audit.read_text().splitlines()]
        assert ids == ["good-0", "good-5"]
        m = st.metrics()
        assert sample(m, "safety_monitor_ingest_items_total", result="rejected") == 4
        assert sample(m, "safety_monitor_requests_total", rpc="Ingest", code="OK") == 1
    finally:
        st.stop()


def test_huge_finite_values_are_rejected_and_no_score_is_ever_nan(sidecar: ServerThread) -> None:
    with grpc.insecure_channel(sidecar.target) as ch:
        score = _raw(ch, "unary_unary", "Score")
        with pytest.raises(grpc.RpcError) as err:
            score(request("h", fill=3e38).SerializeToString(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "|x| <= 1e+06" in err.value.details()
        # the largest accepted magnitude still gives finite scores everywhere
        reply = pb.ScoreResponse.FromString(score(request("edge", fill=1e6).SerializeToString(), timeout=10))
    assert reply.detectors and all(np.isfinite([d.score, d.probability, d.recent_score]).all() for d in reply.detectors)


def test_cancelled_and_deadline_exceeded_streams_are_counted_as_such() -> None:
    st = ServerThread(config())
    try:
        with grpc.insecure_channel(st.target) as ch:
            stream = _raw(ch, "stream_stream", "ScoreStream")
            first = pb.ScoreChunk(request_id="c", model=MODEL, activations=request("c").activations)
            release = threading.Event()

            def chunks():  # type: ignore[no-untyped-def]
                yield first.SerializeToString()
                release.wait(10)

            call = stream(chunks(), timeout=30)
            next(call)  # one verdict back: the stream is live on the server
            call.cancel()
            release.set()
            release2 = threading.Event()

            def slow():  # type: ignore[no-untyped-def]
                yield first.SerializeToString()
                release2.wait(10)

            with pytest.raises(grpc.RpcError) as err:
                for _ in stream(slow(), timeout=1.0):
                    pass
            release2.set()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 10
        while True:
            m = st.metrics()
            done = sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="CANCELLED") == 1
            done &= sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="DEADLINE_EXCEEDED") == 1
            if done or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert done, {k: v for k, v in m.items() if k[0] == "safety_monitor_requests_total"}
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="OK") == 0
    finally:
        st.stop()


def test_idle_streams_are_closed_and_streams_have_a_chunk_limit() -> None:
    st = ServerThread(config(stream_idle_seconds=0.5, max_stream_chunks=3, max_streams=2))
    try:
        with grpc.insecure_channel(st.target) as ch:
            stream = _raw(ch, "stream_stream", "ScoreStream")
            hold = threading.Event()

            def idle():  # type: ignore[no-untyped-def]
                yield pb.ScoreChunk(
                    request_id="i", model=MODEL, activations=request("i").activations
                ).SerializeToString()
                hold.wait(10)

            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream(idle(), timeout=20):
                    pass
            hold.set()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "stream_idle_seconds" in err.value.details() and time.monotonic() - t0 < 5
            many = [pb.ScoreChunk(request_id="m", model=MODEL, activations=request("m").activations)] * 5
            with pytest.raises(grpc.RpcError) as err:
                for _ in stream(iter([c.SerializeToString() for c in many]), timeout=20):
                    pass
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_stream_chunks" in err.value.details()
        m = st.metrics()
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="DEADLINE_EXCEEDED") == 1
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="RESOURCE_EXHAUSTED") == 1
    finally:
        st.stop()


def test_idle_and_abandoned_streams_never_starve_score() -> None:
    """Streams fill their own budget; every Score is admitted, every refused stream is counted."""
    st = ServerThread(config(max_streams=4, max_in_flight=8, stream_idle_seconds=30))
    hold = threading.Event()
    calls = []
    try:
        with grpc.insecure_channel(st.target) as ch:
            stream = _raw(ch, "stream_stream", "ScoreStream")
            first = pb.ScoreChunk(request_id="h", model=MODEL, activations=request("h").activations).SerializeToString()

            def idle():  # type: ignore[no-untyped-def]
                yield first
                hold.wait(30)

            for _ in range(4):  # 4 idle streams take every stream slot
                call = stream(idle(), timeout=60)
                next(call)
                calls.append(call)
            refused = 0
            for _ in range(6):  # abandoned attempts: each is shed and counted
                try:
                    for _ in stream(iter([first]), timeout=10):
                        pass
                except grpc.RpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    refused += 1
            assert refused == 6
            with MonitorClient(st.target) as client:
                x = np.random.default_rng(1).normal(size=(4, D_MODEL)).astype(np.float32)
                replies = [
                    client.score(Generation(f"s{i}", MODEL, output="ok", activations={HOOK: x})) for i in range(40)
                ]
            assert len(replies) == 40
        m = st.metrics()
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="OK") == 40
        assert sample(m, "safety_monitor_shed_requests_total", rpc="ScoreStream") == 6
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="RESOURCE_EXHAUSTED") == 6
    finally:
        hold.set()
        for call in calls:
            call.cancel()
        st.stop()


def test_bearer_scheme_is_case_insensitive_and_duplicate_headers_are_refused() -> None:
    st = ServerThread(config(auth_token="s3cret"))
    try:
        with grpc.insecure_channel(st.target) as ch:
            score = _raw(ch, "unary_unary", "Score")
            body = request("a").SerializeToString()
            assert pb.ScoreResponse.FromString(score(body, metadata=(("authorization", "bearer s3cret"),))).request_id
            with pytest.raises(grpc.RpcError) as err:
                score(body, metadata=(("authorization", "Bearer wrong"), ("authorization", "Bearer s3cret")))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "2 authorization headers" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                score(body, metadata=(("authorization", "Basic s3cret"),))
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        m = st.metrics()
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="UNAUTHENTICATED") == 2
    finally:
        st.stop()


def test_unauthenticated_large_bodies_are_refused_unread(tmp_path: Path) -> None:
    server = ServeProcess(log_path=tmp_path / "server.log", env={"SAFETY_MONITOR_AUTH_TOKEN": "s3cret"}).wait()
    try:
        big = request("big", n=4).SerializeToString() + b"\x1a" + b"\x80\x80\x80\x1e" + b"a" * (60 << 20)
        opts = [("grpc.max_send_message_length", 128 << 20)]
        with grpc.insecure_channel(server.target, options=opts) as ch:
            score = _raw(ch, "unary_unary", "Score")
            with pytest.raises(grpc.RpcError) as err:  # warm-up: channel, threads, first allocation
                score(big, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            before = server.rss_kib()
            for _ in range(5):
                with pytest.raises(grpc.RpcError) as err:
                    score(big, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            after = server.rss_kib()
        assert after - before < 4 * 1024, f"RSS grew {after - before} KiB over five 60 MiB bodies"
    finally:
        server.stop()


class _BrokenCritic(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint that answers 200 with a body no critic can use."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        body = b'{"choices": "not a list"}' if self.path.endswith("completions") else b"{}"
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_critique_workers_survive_a_malformed_critic_reply() -> None:
    http = ThreadingHTTPServer(("127.0.0.1", 0), _BrokenCritic)
    threading.Thread(target=http.serve_forever, daemon=True).start()
    metrics = MonitorMetrics()

    async def go() -> CritiqueService:
        backend = OpenAIChatBackend(f"http://127.0.0.1:{http.server_address[1]}", MODEL, timeout=10)
        service = CritiqueService(
            Critic(backend, mode="fast", timeout=10),
            CritiquePolicy(flagged=True, sample_rate=0.0),
            concurrency=1,
            metrics=metrics,
            principles=["least_harmful"],
        )
        await service.start()
        for i in range(5):  # one worker: if the first bad reply killed it, nothing after would run
            service.offer(CritiqueEvent(f"c{i}", "Hi", "Hello.", True))
            await asyncio.sleep(0.05)
        deadline = time.monotonic() + 20
        while service.done < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await service.stop()
        await backend.aclose()
        return service

    try:
        service = asyncio.run(go())
    finally:
        http.shutdown()
    assert service.done == 5
    outcomes = (
        metrics.critiques.labels("*", "error")._value.get() + metrics.critiques.labels("*", "failed")._value.get()
    )
    assert outcomes == 5


def test_submit_drops_only_the_generation_it_cannot_encode(sidecar: ServerThread) -> None:
    x = np.ones((2, D_MODEL), np.float32)
    with MonitorClient(sidecar.target, batch_size=32) as client:
        client.submit(Generation("enc-0", MODEL, output="ok", activations={HOOK: x}))
        client.submit(Generation("enc-1", MODEL, prompt="lone \ud800 surrogate", output="ok", activations={HOOK: x}))
        client.submit(Generation("enc-2", MODEL, output="ok", activations={HOOK: np.array([[object()]])}))
        client.submit(Generation("enc-3", MODEL, output="ok", activations={HOOK: x}))
        assert client.flush(20)
        assert (client.delivered, client.dropped) == (2, 2)
    assert sample(sidecar.metrics(), "safety_monitor_ingest_items_total", result="accepted") == 2
