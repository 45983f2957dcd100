"""The real server on 127.0.0.1 with the real client: round-trips, validation, metrics."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.client import Generation, InvalidRequest, MonitorClient, ServerBusy, Unauthenticated
from monitor.server import SERVICE_NAME
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, config, sample

rng = np.random.default_rng(7)


def acts(n: int) -> np.ndarray:
    return rng.normal(size=(n, D_MODEL)).astype(np.float32)


def gen(rid: str, n: int = 8, **kw: object) -> Generation:
    base: dict = {
        "request_id": rid,
        "model": MODEL,
        "prompt": "Why?",
        "output": "Because it is.",
        "activations": {HOOK: acts(n)},
    }
    base.update(kw)
    return Generation(**base)


def test_score_round_trip(sidecar: ServerThread) -> None:
    x = acts(12)
    with MonitorClient(sidecar.target) as client:
        reply = client.score(gen("req-1", activations={HOOK: x}, labels={"tenant": "a"}))
    assert reply.request_id == "req-1"
    (hs,) = reply.hook_stats
    assert hs.hook_point == HOOK and hs.tokens == 12
    assert hs.mean_l2_norm == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-6)
    assert reply.text_stats["words"] == 3
    assert reply.server_seconds > 0
    # 9: the detectors that read the answer (deceptive_answer, sycophancy, refusal); without a
    # decision row the prompt detectors (deceptive_setup, harmful_request) and harmful_compliance stay silent
    assert len(reply.detectors) == 9 and reply.flagged == any(d.fired for d in reply.detectors)
    assert {d.behaviour for d in reply.detectors} == {"deceptive_answer", "sycophancy", "refusal"}


def test_score_stream_round_trip(sidecar: ServerThread) -> None:
    parts = [acts(n) for n in (5, 1, 1, 3)]
    with MonitorClient(sidecar.target) as client, client.stream("s-1", MODEL, prompt="Hi") as s:
        verdicts = [s.send({HOOK: p}, f"t{i} ", final=i == 3) for i, p in enumerate(parts)]
    assert [v.chunk_index for v in verdicts] == [0, 1, 2, 3]
    assert [v.tokens_seen for v in verdicts] == [5, 6, 7, 10]
    halts = [v.halt for v in verdicts]
    assert verdicts[-1].final and halts == sorted(halts)  # HALT, once advised, stays
    assert {d.detector for d in verdicts[-1].detectors} == {d.detector for d in verdicts[0].detectors}
    allrows = np.concatenate(parts)
    assert verdicts[-1].hook_stats[0].mean_l2_norm == pytest.approx(np.linalg.norm(allrows, axis=1).mean(), rel=1e-6)
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_stream_chunks_total") == 4
    assert sample(m, "safety_monitor_generations_scored_total", rpc="ScoreStream") == 1


def test_ingest_counts_good_and_bad_items(sidecar: ServerThread) -> None:
    items = [gen(f"i-{k}", n=3) for k in range(100)]
    items[10] = gen("bad-model", model="other")
    items[70] = gen("bad-shape", activations={HOOK: np.zeros((2, 100), np.float32)})
    with MonitorClient(sidecar.target) as client:
        report = client.ingest(items)
    assert (report.received, report.accepted, report.rejected) == (100, 98, 2)
    assert [(i, rid) for i, rid, _ in report.errors] == [(10, "bad-model"), (70, "bad-shape")]
    assert "model: expected one of" in report.errors[0][2]
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_ingest_items_total", result="accepted") == 98
    assert sample(m, "safety_monitor_tokens_scored_total", hook_point=HOOK) == 98 * 3


def test_get_detectors_describes_bundle(sidecar: ServerThread) -> None:
    with MonitorClient(sidecar.target) as client:
        cat = client.get_detectors()
    assert cat.model == MODEL and cat.bundle_name == "smollm2-135m-default"
    assert [(h.name, h.d_model, h.max_tokens) for h in cat.hook_points] == [(HOOK, 576, 8192)]
    assert len(cat.detectors) == 16
    assert {d.behaviour for d in cat.detector_infos} == {
        "deceptive_setup",
        "deceptive_answer",
        "sycophancy",
        "refusal",
        "harmful_request",
        "harmful_compliance",
    }
    sl = cat.hook_points[0].encoder_slice
    assert sl is not None and sl.w_enc.shape == (576, sl.width) and sl.dense_columns == 7


def test_health_serving_and_reflection(sidecar: ServerThread) -> None:
    with grpc.insecure_channel(sidecar.target) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICE_NAME):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        services = ProtoReflectionDescriptorDatabase(ch).get_services()
    assert SERVICE_NAME in services and "grpc.health.v1.Health" in services


def _raw(shape: list[int], dtype: int, data: bytes, hook: str = HOOK) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id="bad",
        model=MODEL,
        activations=[pb.ActivationBlock(hook_point=hook, activations=pb.Tensor(shape=shape, dtype=dtype, data=data))],
    )


NAN = np.zeros((2, D_MODEL), np.float32)
NAN[1, 5] = np.nan

MALFORMED = {
    "wrong dtype": (
        _raw([2, D_MODEL], 0, b"\0" * 2 * D_MODEL * 4),
        "activations[0].activations.dtype: expected one of F32, F16, BF16, got DTYPE_UNSPECIFIED",
    ),
    "wrong byte length": (
        _raw([2, D_MODEL], pb.DTYPE_F16, b"\0" * (2 * D_MODEL * 2 - 2)),
        "activations[0].activations.data: expected 2304 bytes",
    ),
    "wrong rank": (
        _raw([2 * D_MODEL], pb.DTYPE_F32, b"\0" * 2 * D_MODEL * 4),
        "activations[0].activations.shape: expected rank 2 [tokens, d_model=576], got rank 1",
    ),
    "wrong d_model": (
        _raw([2, 512], pb.DTYPE_F32, b"\0" * 2 * 512 * 4),
        "activations[0].activations.shape[1] (d_model): expected 576",
    ),
    "NaN": (
        _raw([2, D_MODEL], pb.DTYPE_F32, NAN.tobytes()),
        "activations[0].activations.data: expected finite values, got nan at index [1, 5]",
    ),
    "oversized": (
        _raw([8193, D_MODEL], pb.DTYPE_F16, b"\0" * 8193 * D_MODEL * 2),
        "activations[0].activations.shape[0] (tokens): expected at most 8192, got 8193",
    ),
    "unknown hook point": (
        _raw([1, D_MODEL], pb.DTYPE_F32, b"\0" * D_MODEL * 4, hook="blocks.3.hook_resid_post"),
        "activations[0].hook_point: expected one of [blocks.16.hook_resid_post]",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_is_invalid_argument_and_server_keeps_serving(sidecar: ServerThread, case: str) -> None:
    request, message = MALFORMED[case]
    with grpc.insecure_channel(sidecar.target, options=[("grpc.max_send_message_length", 64 << 20)]) as ch:
        stub = pb_grpc.SafetyMonitorStub(ch)
        with pytest.raises(grpc.RpcError) as e:
            stub.Score(request, timeout=10)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert e.value.details().startswith(message), e.value.details()
    with MonitorClient(sidecar.target) as client:  # still serving
        assert client.score(gen("after")).hook_stats[0].tokens == 8
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_requests_total", rpc="Score", code="INVALID_ARGUMENT") == 1
    assert sample(m, "safety_monitor_requests_total", rpc="Score", code="OK") == 1


def test_client_maps_invalid_argument(sidecar: ServerThread) -> None:
    with MonitorClient(sidecar.target) as client, pytest.raises(InvalidRequest, match="model: expected"):
        client.score(gen("x", model="llama"))


def test_metrics_show_the_traffic_this_test_caused(sidecar: ServerThread) -> None:
    with MonitorClient(sidecar.target) as client:
        for k in range(5):
            client.score(gen(f"m{k}", n=4))
        with pytest.raises(InvalidRequest):
            client.score(gen("nan", activations={HOOK: NAN}))
        client.get_detectors()
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_requests_total", rpc="Score", code="OK") == 5
    assert sample(m, "safety_monitor_requests_total", rpc="Score", code="INVALID_ARGUMENT") == 1
    assert sample(m, "safety_monitor_requests_total", rpc="GetDetectors", code="OK") == 1
    assert sample(m, "safety_monitor_invalid_inputs_total", rpc="Score", reason="non_finite") == 1
    assert sample(m, "safety_monitor_tokens_scored_total", hook_point=HOOK) == 20
    assert sample(m, "safety_monitor_received_bytes_total", rpc="Score") == 5 * 4 * D_MODEL * 4
    assert sample(m, "safety_monitor_request_duration_seconds_count", rpc="Score") == 6
    assert sample(m, "safety_monitor_in_flight_requests", rpc="Score") == 0
    assert sample(m, "safety_monitor_activation_mean_l2_norm_count", hook_point=HOOK) == 5


def test_streams_are_shed_past_max_streams_and_never_starve_score() -> None:
    st = ServerThread(config(max_in_flight=1, max_streams=1))
    try:
        with MonitorClient(st.target) as client, client.stream("hold", MODEL) as s:
            s.send({HOOK: acts(2)})  # this stream now occupies the only stream slot
            with pytest.raises(ServerBusy, match="max_streams=1"), client.stream("shed", MODEL) as s2:
                s2.send({HOOK: acts(2)})
            assert client.score(gen("admitted")).request_id == "admitted"  # unary budget is separate
        m = st.metrics()
        assert sample(m, "safety_monitor_shed_requests_total", rpc="ScoreStream") == 1
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="RESOURCE_EXHAUSTED") == 1
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="OK") == 1
    finally:
        st.stop()


def test_bearer_token_required_when_configured() -> None:
    st = ServerThread(config(auth_token="s3cret"))
    try:
        with MonitorClient(st.target) as anon, pytest.raises(Unauthenticated, match="authorization"):
            anon.score(gen("a"))
        with MonitorClient(st.target, token="wrong") as bad, pytest.raises(Unauthenticated):
            bad.get_detectors()
        with MonitorClient(st.target, token="s3cret") as ok:
            assert ok.score(gen("b")).request_id == "b"
        with grpc.insecure_channel(st.target) as ch:  # probes need no token
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        m = st.metrics()
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="UNAUTHENTICATED") == 1
    finally:
        st.stop()
