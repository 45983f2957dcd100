"""Clients that stop reading or cancel while the server is blocked sending, against a real
``monitor serve`` on 127.0.0.1 with its default limits."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor._proto import monitor_pb2 as pb
from tests.conftest import D_MODEL, HOOK, MODEL, ServeProcess, sample

SERVICE = "/safety_monitor.v1.SafetyMonitor/"
# A client that grants the server almost no receive window and never reads: after a verdict or
# two the server's send blocks on HTTP/2 flow control (BDP probing would grow the window).
NON_READING = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]


def _block() -> pb.ActivationBlock:
    x = np.zeros((1, D_MODEL), np.float16)
    return pb.ActivationBlock(
        hook_point=HOOK, activations=pb.Tensor(shape=[1, D_MODEL], dtype=pb.DTYPE_F16, data=x.tobytes())
    )


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


class NonReader:
    """One ScoreStream whose client keeps sending chunks and never reads a verdict."""

    def __init__(self, target: str, rid: str) -> None:
        self.channel = grpc.insecure_channel(target, options=NON_READING)
        self.sent = 0
        self._stop = threading.Event()
        stream = self.channel.stream_stream(
            SERVICE + "ScoreStream", request_serializer=lambda b: b, response_deserializer=lambda b: b
        )
        self.call = stream(self._chunks(rid))

    def _chunks(self, rid: str) -> Iterator[bytes]:
        yield pb.ScoreChunk(request_id=rid, model=MODEL, activations=[_block()]).SerializeToString()
        nxt = pb.ScoreChunk(activations=[_block()]).SerializeToString()
        while not self._stop.is_set():
            self.sent += 1
            yield nxt

    def close(self) -> None:
        self._stop.set()
        self.call.cancel()
        self.channel.close()


def _wait_blocked(readers: list[NonReader], timeout: float = 60) -> None:
    """Until no reader has sent anything for 1 s: every server send is blocked, every window full."""
    deadline = time.monotonic() + timeout
    last = [-1] * len(readers)
    while time.monotonic() < deadline:
        now = [r.sent for r in readers]
        if now == last and all(n > 0 for n in now):
            return
        last = now
        time.sleep(1.0)
    raise AssertionError(f"streams never blocked: sent {[r.sent for r in readers]}")


def _try_stream(target: str) -> grpc.StatusCode:
    chunk = pb.ScoreChunk(request_id="new", model=MODEL, activations=[_block()], final=True)
    with grpc.insecure_channel(target) as ch:
        stream = ch.stream_stream(SERVICE + "ScoreStream", request_serializer=pb.ScoreChunk.SerializeToString)
        try:
            replies = list(stream(iter([chunk]), timeout=10))
        except grpc.RpcError as exc:
            return exc.code()
        assert len(replies) == 1
        return grpc.StatusCode.OK


def _try_ingest(target: str) -> grpc.StatusCode:
    x = np.zeros((2, D_MODEL), np.float32)
    t = pb.Tensor(shape=[2, D_MODEL], dtype=pb.DTYPE_F32, data=x.tobytes())
    item = pb.ScoreRequest(
        request_id="i", model=MODEL, output="ok", activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)]
    )
    with grpc.insecure_channel(target) as ch:
        ingest = ch.stream_unary(
            SERVICE + "Ingest",
            request_serializer=pb.ScoreRequest.SerializeToString,
            response_deserializer=pb.IngestSummary.FromString,
        )
        try:
            summary = ingest(iter([item]), timeout=10)
        except grpc.RpcError as exc:
            return exc.code()
        assert summary.accepted == 1
        return grpc.StatusCode.OK


def test_non_reading_stream_clients_lose_their_slots_after_the_send_deadline(tmp_path: Path) -> None:
    """With max_streams=32 (the default is 1024: fewer threads here) and the default
    send_timeout_seconds=10, 32 clients that never read hold every stream slot only until the send
    deadline; then new streams and Ingest calls get in."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text("max_streams: 32\n")
    server = ServeProcess("--config", str(cfg), log_path=tmp_path / "server.log").wait()
    readers: list[NonReader] = []
    try:
        readers = [NonReader(server.target, f"slow-{i}") for i in range(32)]
        _wait_blocked(readers)
        m = _scrape(server.metrics_url)
        assert sample(m, "safety_monitor_in_flight_requests", rpc="ScoreStream") == 32
        assert _try_stream(server.target) == grpc.StatusCode.RESOURCE_EXHAUSTED  # every slot is held now
        t0 = time.monotonic()
        deadline = t0 + 10 + 30  # the send deadline plus generous slack for two shared cores
        codes: tuple[grpc.StatusCode, grpc.StatusCode] = (grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNKNOWN)
        while time.monotonic() < deadline:
            codes = (_try_stream(server.target), _try_ingest(server.target))
            if codes == (grpc.StatusCode.OK, grpc.StatusCode.OK):
                break
            time.sleep(1.0)
        assert codes == (grpc.StatusCode.OK, grpc.StatusCode.OK), (
            f"still locked out after {time.monotonic() - t0:.0f} s"
        )
        m = _scrape(server.metrics_url)
        assert sample(m, "safety_monitor_send_timeouts_total", rpc="ScoreStream") == 32
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="DEADLINE_EXCEEDED") == 32
        assert sample(m, "safety_monitor_in_flight_requests", rpc="ScoreStream") == 0
    finally:
        for r in readers:
            r.close()
        assert server.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "send_timeout_seconds" in log  # the rate-limited line saying why the streams ended


@pytest.mark.parametrize("streams", [8])
def test_cancelled_send_blocked_streams_are_counted_without_a_traceback(tmp_path: Path, streams: int) -> None:
    server = ServeProcess(log_path=tmp_path / "server.log").wait()
    readers: list[NonReader] = []
    try:
        readers = [NonReader(server.target, f"cancel-{i}") for i in range(streams)]
        _wait_blocked(readers)
        for r in readers:
            r.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            m = _scrape(server.metrics_url)
            if sample(m, "safety_monitor_in_flight_requests", rpc="ScoreStream") == 0:
                break
            time.sleep(0.2)
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="CANCELLED") == streams
        assert sample(m, "safety_monitor_requests_total", rpc="ScoreStream", code="INTERNAL") == 0
        assert sample(m, "safety_monitor_send_timeouts_total", rpc="ScoreStream") == 0
        assert _try_stream(server.target) == grpc.StatusCode.OK
    finally:
        for r in readers:
            r.close()
        assert server.stop() == 0
    log = (tmp_path / "server.log").read_text()
    assert "Traceback" not in log and "ExecuteBatchError" not in log, log[-3000:]
