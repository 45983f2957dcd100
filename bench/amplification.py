"""Benchmark: health-check stalls and sidecar memory under requests that are small on the wire and
expensive to parse, unfinished bodies, non-reading streams and a fuzz mix.

Peer: the same `monitor serve` process with no hostile traffic, measured first in the same run.
A thread checks gRPC health every 10 ms throughout; for each phase the bench prints the longest
health check (goal: no single request stalls health for more than 100 ms) and, at the end, the
sidecar's RSS after each of ``--passes`` passes of the whole mix against its RSS after warm-up
(goal: within 20 %). Each pass sends: one Score of 4 M empty ActivationBlocks (8 MiB), three
Scores with a 57 MiB packed ``shape``, ten 40 MiB bodies left unfinished (closed after
``stream_idle_seconds``), eight ScoreStreams that never read their verdicts, a valid 8192-token
Score, and ``--fuzz`` requests of ``scripts/fuzz_server.py``.

Run: ``python bench/amplification.py [--passes 8] [--fuzz 1500]``."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import multiprocessing as mp
import socket
import struct
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from monitor._proto import monitor_pb2 as pb
from monitor.server import SidecarProcess

REPO = Path(__file__).resolve().parents[1]
SERVICE = "/safety_monitor.v1.SafetyMonitor/"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.16.hook_resid_post"
D_MODEL = 576


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | 0x80 if n else low)
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def valid(rid: str, tokens: int = 4) -> bytes:
    x = np.random.default_rng(0).normal(size=(tokens, D_MODEL)).astype(np.float32)
    t = pb.Tensor(shape=[tokens, D_MODEL], dtype=pb.DTYPE_F32, data=x.tobytes())
    return pb.ScoreRequest(
        request_id=rid, model=MODEL, output="ok", activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)]
    ).SerializeToString()


def empty_blocks() -> bytes:
    return valid("flood") + _field(5, b"") * 4_000_000


def packed_shape(mib: int = 57) -> bytes:
    block = _field(1, HOOK.encode()) + _field(2, _field(1, b"\x01" * (mib << 20)))
    return pb.ScoreRequest(request_id="shape", model=MODEL).SerializeToString() + _field(5, block)


def _probe(target: str, conn: Connection) -> None:
    """In its own process (no GIL shared with the hostile clients): check health every 10 ms and
    answer each message on ``conn`` with the longest check since the previous one."""
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(target))
    worst = 0.0
    while True:
        if conn.poll():
            if conn.recv() == "stop":
                return
            conn.send(worst)
            worst = 0.0
        t0 = time.perf_counter()
        with contextlib.suppress(grpc.RpcError):
            stub.Check(health_pb2.HealthCheckRequest(), timeout=60)
        worst = max(worst, time.perf_counter() - t0)
        time.sleep(0.01)


class HealthProbe:
    """``take()`` returns the longest health check since the last ``take()``."""

    def __init__(self, target: str) -> None:
        self._conn, child = mp.Pipe()
        self._proc = mp.get_context("spawn").Process(target=_probe, args=(target, child), daemon=True)
        self._proc.start()

    def take(self) -> float:
        self._conn.send("take")
        return float(self._conn.recv())

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(10)


def unfinished_bodies(port: int, n: int = 10, declared: int = 40 << 20) -> socket.socket:
    """``n`` Score calls on one raw HTTP/2 connection, each body declaring ``declared`` bytes, sending 4 KiB."""
    sock = socket.create_connection(("127.0.0.1", port))

    def frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload

    def lit(name: bytes, value: bytes) -> bytes:
        return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value

    sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0, b"") + frame(4, 1, 0, b""))
    headers = lit(b":method", b"POST") + lit(b":scheme", b"http") + lit(b":path", (SERVICE + "Score").encode())
    headers += lit(b":authority", b"127.0.0.1") + lit(b"content-type", b"application/grpc") + lit(b"te", b"trailers")
    for i in range(n):
        sid = 2 * i + 1
        sock.sendall(frame(1, 4, sid, headers) + frame(0, 0, sid, b"\x00" + struct.pack(">I", declared) + bytes(4096)))
    return sock


def non_readers(target: str, n: int = 8) -> list[tuple[grpc.Channel, grpc.Future, threading.Event]]:
    out = []
    x = np.zeros((1, D_MODEL), np.float16)
    blk = pb.ActivationBlock(
        hook_point=HOOK, activations=pb.Tensor(shape=[1, D_MODEL], dtype=pb.DTYPE_F16, data=x.tobytes())
    )
    for i in range(n):
        ch = grpc.insecure_channel(target, options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)])
        stop = threading.Event()

        def chunks(rid: str = f"nr{i}", stop: threading.Event = stop):  # type: ignore[no-untyped-def]
            yield pb.ScoreChunk(request_id=rid, model=MODEL, activations=[blk]).SerializeToString()
            while not stop.is_set():
                yield pb.ScoreChunk(activations=[blk]).SerializeToString()

        call = ch.stream_stream(SERVICE + "ScoreStream", request_serializer=lambda b: b)(chunks())
        out.append((ch, call, stop))
    return out


def _fuzz_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("fuzz_server", REPO / "scripts" / "fuzz_server.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--passes", type=int, default=8)
    ap.add_argument("--fuzz", type=int, default=1500)
    args = ap.parse_args(argv)
    fuzz = _fuzz_module()
    server = SidecarProcess(env={"SAFETY_MONITOR_STREAM_IDLE_SECONDS": "5", "SAFETY_MONITOR_SEND_TIMEOUT_SECONDS": "5"})
    server.wait()
    opts = [("grpc.max_send_message_length", 128 << 20)]
    ch = grpc.insecure_channel(server.target, options=opts)
    score = ch.unary_unary(SERVICE + "Score", request_serializer=lambda b: b, response_deserializer=lambda b: b)

    def send(body: bytes) -> str:
        try:
            score(body, timeout=120)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name

    probe = HealthProbe(server.target)
    try:
        for i in range(20):  # warm-up: channels, threads, first allocations, one fuzz pass
            send(valid(f"w{i}", 64))
        fuzz.fuzz(server.target, args.fuzz, seed=100)
        time.sleep(1.0)
        probe.take()
        time.sleep(3.0)
        peer = probe.take()
        warm_rss = server.rss_kib()
        print(f"peer (no hostile traffic, 3 s): longest health check {peer * 1e3:.1f} ms")
        print(f"RSS after warm-up: {warm_rss / 1024:.1f} MiB")
        big = valid("big", 8192)
        flood, shapes = empty_blocks(), packed_shape()
        worst: dict[str, float] = {}
        rss = []
        for p in range(args.passes):
            phases = {
                "4 M empty blocks (8 MiB)": lambda: send(flood),
                "3 x 57 MiB packed shape": lambda: ",".join(send(shapes) for _ in range(3)),
                "valid 8192-token Score (18 MiB)": lambda: send(big),
                f"fuzz mix ({args.fuzz} requests)": lambda seed=p: str(
                    sum(fuzz.fuzz(server.target, args.fuzz, seed=seed).values())
                ),
            }
            for name, run in phases.items():
                probe.take()
                result = run()
                worst[name] = max(worst.get(name, 0.0), probe.take())
                if p == 0:
                    print(f"  {name}: {result}")
            probe.take()
            sock = unfinished_bodies(server.port)
            readers = non_readers(server.target)
            time.sleep(7.0)  # past stream_idle_seconds and send_timeout_seconds (5 s here)
            sock.close()
            for c, call, stop in readers:
                stop.set()
                call.cancel()
                c.close()
            worst["10 unfinished 40 MiB bodies + 8 non-reading streams"] = max(
                worst.get("10 unfinished 40 MiB bodies + 8 non-reading streams", 0.0), probe.take()
            )
            time.sleep(1.0)
            rss.append(server.rss_kib())
            print(f"pass {p + 1}: RSS {rss[-1] / 1024:.1f} MiB ({(rss[-1] / warm_rss - 1) * 100:+.1f} %)", flush=True)
        print()
        print("| phase | longest health check (ms) |")
        print("|---|---:|")
        print(f"| no hostile traffic (peer) | {peer * 1e3:.1f} |")
        for name, w in worst.items():
            print(f"| {name} | {w * 1e3:.1f} |")
        dev = max(abs(r / warm_rss - 1) for r in rss) * 100
        print(
            f"\nRSS after warm-up {warm_rss / 1024:.1f} MiB; after passes " + ", ".join(f"{r / 1024:.0f}" for r in rss)
        )
        print(
            f"largest deviation {dev:.1f} % (goal <= 20 %); "
            f"longest health check {max(worst.values()) * 1e3:.1f} ms (goal <= 100 ms)"
        )
    finally:
        probe.stop()
        ch.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
