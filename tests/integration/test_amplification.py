"""Bodies that are small on the wire but huge once parsed, and bodies that never finish, against a
real ``monitor serve`` on 127.0.0.1: refused by what they declare, before anything is built."""

from __future__ import annotations

import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor._proto import monitor_pb2 as pb
from tests.conftest import D_MODEL, HOOK, MODEL, ServeProcess, sample

SERVICE = "/safety_monitor.v1.SafetyMonitor/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        if n:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _valid(rid: str) -> pb.ScoreRequest:
    x = np.random.default_rng(0).normal(size=(4, D_MODEL)).astype(np.float32)
    t = pb.Tensor(shape=[4, D_MODEL], dtype=pb.DTYPE_F32, data=x.tobytes())
    return pb.ScoreRequest(
        request_id=rid, model=MODEL, output="ok", activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)]
    )


def _scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


@pytest.fixture
def server(tmp_path: Path):  # type: ignore[no-untyped-def]
    proc = ServeProcess(log_path=tmp_path / "server.log").wait()
    yield proc
    assert proc.stop() == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()


def _score_raw(target: str, body: bytes) -> grpc.RpcError | bytes:
    with grpc.insecure_channel(target) as ch:
        score = ch.unary_unary(SERVICE + "Score", request_serializer=lambda b: b, response_deserializer=lambda b: b)
        try:
            return score(body, timeout=120)  # type: ignore[no-any-return]
        except grpc.RpcError as exc:
            return exc


def test_a_flood_of_empty_blocks_is_refused_by_its_count_before_parsing(server: ServeProcess) -> None:
    """4 M empty ActivationBlocks (8 MiB on the wire) used to become 4 M objects: ~1.2 GB, 16 s."""
    assert isinstance(_score_raw(server.target, _valid("warm").SerializeToString()), bytes)
    before = server.rss_kib()
    body = _valid("flood").SerializeToString() + _field(5, b"") * 4_000_000
    err = _score_raw(server.target, body)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    grown = server.rss_kib() - before
    assert grown < 4 * len(body) // 1024, f"RSS grew {grown} KiB for one refused {len(body) >> 10} KiB request"
    assert err.details() == "activations: expected at most 64 blocks (one per hook point), got more than 64 blocks"
    m = _scrape(server.metrics_url)
    assert sample(m, "safety_monitor_invalid_inputs_total", rpc="Score", reason="too_many_blocks") == 1
    assert isinstance(_score_raw(server.target, _valid("after").SerializeToString()), bytes)


def test_a_huge_packed_shape_is_refused_naming_the_field(server: ServeProcess) -> None:
    """A 24 MiB packed ``shape`` (24 M dimensions) used to become 24 M integers and a 50 MB error."""
    assert isinstance(_score_raw(server.target, _valid("warm").SerializeToString()), bytes)
    before = server.rss_kib()
    tensor = _field(1, b"\x01" * (24 << 20))
    block = _field(1, HOOK.encode()) + _field(2, tensor)
    body = pb.ScoreRequest(request_id="shape", model=MODEL, output="ok").SerializeToString() + _field(5, block)
    err = _score_raw(server.target, body)
    assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
    grown = server.rss_kib() - before  # the body itself is buffered and copied once: linear, not amplified
    assert grown < 4 * len(body) // 1024, f"RSS grew {grown} KiB for one refused {len(body) >> 10} KiB request"
    assert err.details() == (
        "activations[0].activations.shape: expected rank 2 [tokens, d_model], got more than 8 dimensions"
    )


def test_ingest_rejects_an_amplifying_item_alone(server: ServeProcess) -> None:
    labels = b"".join(_field(6, _field(1, f"k{i}".encode()) + _field(2, b"v")) for i in range(100_000))
    items = [
        _valid("a").SerializeToString(),
        _valid("b").SerializeToString() + labels,
        _valid("c").SerializeToString(),
    ]
    with grpc.insecure_channel(server.target) as ch:
        ingest = ch.stream_unary(
            SERVICE + "Ingest", request_serializer=lambda b: b, response_deserializer=pb.IngestSummary.FromString
        )
        summary = ingest(iter(items), timeout=60)
    assert (summary.accepted, summary.rejected) == (2, 1)
    assert summary.errors[0].index == 1
    assert summary.errors[0].message == "labels: expected at most 8 entries, got more than 8 entries"


class RawH2:
    """The smallest HTTP/2 client that can start a gRPC call and leave its body unfinished.

    A gRPC client library always finishes a message; a hostile or broken one need not.
    """

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.ended: dict[int, str] = {}
        self._lock = threading.Lock()
        self.sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + self._frame(4, 0, 0, b""))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @staticmethod
    def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def _send(self, data: bytes) -> None:
        with self._lock:
            self.sock.sendall(data)

    def _read(self) -> None:
        buf = b""
        self.sock.settimeout(None)
        try:
            while True:
                while len(buf) < 9:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                length = int.from_bytes(buf[:3], "big")
                kind, flags, stream = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
                while len(buf) < 9 + length:
                    chunk = self.sock.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                payload, buf = buf[9 : 9 + length], buf[9 + length :]
                if kind == 4 and not flags & 1:  # SETTINGS: acknowledge
                    self._send(self._frame(4, 1, 0, b""))
                elif kind == 6 and not flags & 1:  # PING: answer
                    self._send(self._frame(6, 1, 0, payload))
                elif kind == 3:  # RST_STREAM
                    self.ended.setdefault(stream, "rst")
                elif kind == 1 and flags & 1:  # HEADERS with END_STREAM: the call's status
                    self.ended.setdefault(stream, "status")
        except OSError:
            return

    def start_unfinished(self, stream: int, path: str, declared: int, sent: int) -> None:
        """HEADERS, then a gRPC message that declares ``declared`` bytes but carries ``sent``."""

        def literal(name: bytes, value: bytes) -> bytes:
            return b"\x00" + _h(name) + _h(value)

        def _h(s: bytes) -> bytes:
            assert len(s) < 127
            return bytes([len(s)]) + s

        headers = b"".join(
            literal(n, v)
            for n, v in [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", path.encode()),
                (b":authority", b"127.0.0.1"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            ]
        )
        self._send(self._frame(1, 4, stream, headers))  # END_HEADERS
        body = b"\x00" + struct.pack(">I", declared) + b"\x00" * sent
        for i in range(0, len(body), 16384):
            self._send(self._frame(0, 0, stream, body[i : i + 16384]))

    def close(self) -> None:
        self.sock.close()


def test_unfinished_bodies_are_timed_out_and_counted(tmp_path: Path) -> None:
    """Calls whose 40 MiB body never finishes end after stream_idle_seconds, counted; before, gRPC
    held them (and their bytes) for as long as the client kept the connection."""
    server = ServeProcess(log_path=tmp_path / "server.log", env={"SAFETY_MONITOR_STREAM_IDLE_SECONDS": "2"}).wait()
    h2 = RawH2(server.port)
    try:
        streams = [1, 3, 5, 7, 9]
        for sid in streams:
            h2.start_unfinished(sid, SERVICE + "Score", declared=40 << 20, sent=10000)
        deadline = time.monotonic() + 2 + 30  # the idle bound plus generous slack for two shared cores
        while time.monotonic() < deadline and len(h2.ended) < len(streams):
            time.sleep(0.2)
        assert h2.ended == {sid: "status" for sid in streams}, f"calls ended: {h2.ended}"  # a status, then RST
        m = _scrape(server.metrics_url)
        assert sample(m, "safety_monitor_receive_timeouts_total", rpc="Score") == len(streams)
        assert sample(m, "safety_monitor_requests_total", rpc="Score", code="DEADLINE_EXCEEDED") == len(streams)
        assert sample(m, "safety_monitor_in_flight_requests", rpc="Score") == 0
    finally:
        h2.close()
        assert server.stop() == 0
    assert "Traceback" not in (tmp_path / "server.log").read_text()
