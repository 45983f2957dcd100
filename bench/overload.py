"""Benchmark: Score latency and sidecar memory while idle and abandoned streams hammer the server.

Peer: the same `monitor serve` process, unloaded, measured first in the same run. Then, while a
separate process keeps the stream slots busy with idle streams (each sends one chunk and goes
silent until `stream_idle_seconds` ends it) and opens and cancels streams, sequential Score calls
are timed. Prints Score p50/p99 unloaded vs loaded (goal: p99 within 3x), the sidecar's RSS
after warm-up (goal: within +-10 %), and every refusal as the client saw it vs as the server
counted it in `safety_monitor_requests_total`. A shed idle-stream holder retries after 50 ms (as
a client with backoff does); abandoning threads pause 10 ms between streams.

Run: ``python bench/overload.py [--n 600] [--holders 10] [--abusers 4]``."""

from __future__ import annotations

import argparse
import multiprocessing as mp
import threading
import time
import urllib.request
from collections import Counter

import grpc
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.server import SidecarProcess

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.16.hook_resid_post"


def block(n: int, seed: int = 0) -> pb.ActivationBlock:
    x = np.random.default_rng(seed).normal(size=(n, 576)).astype(np.float32)
    return pb.ActivationBlock(
        hook_point=HOOK, activations=pb.Tensor(shape=[n, 576], dtype=pb.DTYPE_F32, data=x.tobytes())
    )


def time_scores(stub: pb_grpc.SafetyMonitorStub, n: int, tokens: int) -> list[float]:
    req = pb.ScoreRequest(request_id="bench", model=MODEL, output="A plain answer.", activations=[block(tokens)])
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        stub.Score(req, timeout=30)
        out.append(time.perf_counter() - t0)
    return out


class Hammer:
    """Background threads: idle stream holders, open-and-cancel abusers, extra (shed) streams."""

    def __init__(self, target: str, holders: int, abusers: int) -> None:
        self.target = target
        self.stop = threading.Event()
        self.codes: Counter[str] = Counter()
        self.lock = threading.Lock()
        chunk = pb.ScoreChunk(request_id="idle", model=MODEL, activations=[block(4, 1)])
        self.first = chunk
        self.threads = [threading.Thread(target=self._hold, daemon=True) for _ in range(holders)]
        self.threads += [threading.Thread(target=self._abandon, daemon=True) for _ in range(abusers)]
        for t in self.threads:
            t.start()

    def _count(self, code: str) -> None:
        with self.lock:
            self.codes[code] += 1

    def _hold(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            while not self.stop.is_set():

                def idle():  # type: ignore[no-untyped-def]
                    yield self.first
                    self.stop.wait(3600)  # silent until the server's idle timeout ends the stream

                try:
                    for _ in stub.ScoreStream(idle(), timeout=120):
                        pass
                    self._count("OK")
                except grpc.RpcError as exc:
                    self._count(exc.code().name)  # type: ignore[attr-defined]
                    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
                        time.sleep(0.05)  # retry like a client that backs off, not in a hot loop

    def _abandon(self) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            while not self.stop.is_set():
                release = threading.Event()
                call = stub.ScoreStream(_first_then_wait(self.first, release), timeout=30)
                try:
                    next(call)
                    call.cancel()  # the client walks away mid-stream
                    self._count("CANCELLED")
                except grpc.RpcError as exc:
                    self._count(exc.code().name)  # type: ignore[attr-defined]
                release.set()
                time.sleep(0.01)

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


def _first_then_wait(first: pb.ScoreChunk, release: threading.Event):  # type: ignore[no-untyped-def]
    yield first
    release.wait(5)


def _hammer_process(target: str, holders: int, abusers: int, seconds: float, out: mp.Queue[dict[str, int]]) -> None:
    """The abusive clients run in their own process: their threads must not share the GIL with
    the client whose Score latency is measured."""
    hammer = Hammer(target, holders, abusers)
    time.sleep(seconds)
    hammer.close()
    out.put(dict(hammer.codes))


def server_codes(url: str, rpc: str) -> Counter[str]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out: Counter[str] = Counter()
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "safety_monitor_requests_total" and s.labels["rpc"] == rpc:
                out[s.labels["code"]] += int(s.value)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=600, help="Score calls per phase")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--max-streams", type=int, default=8)
    ap.add_argument("--holders", type=int, default=10, help="threads keeping an idle stream open")
    ap.add_argument("--abusers", type=int, default=4, help="threads opening and cancelling streams")
    ap.add_argument("--seconds", type=float, default=25, help="how long the hammer runs (longer than the phase)")
    ns = ap.parse_args()
    env = {
        "SAFETY_MONITOR_MAX_STREAMS": str(ns.max_streams),
        "SAFETY_MONITOR_STREAM_IDLE_SECONDS": "2",
    }
    server = SidecarProcess(env=env).wait()
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            time_scores(stub, 100, ns.tokens)  # warm-up
            unloaded = time_scores(stub, ns.n, ns.tokens)
            results: mp.Queue[dict[str, int]] = mp.Queue()
            hammer = mp.Process(
                target=_hammer_process,
                args=(server.target, ns.holders, ns.abusers, ns.seconds, results),
            )
            hammer.start()
            time.sleep(3)  # every stream slot is taken; the extra holders are being shed
            time_scores(stub, 100, ns.tokens)  # warm-up under load
            rss = [server.rss_kib()]
            loaded: list[float] = []
            for _ in range(5):
                loaded += time_scores(stub, ns.n // 5, ns.tokens)
                rss.append(server.rss_kib())
            if hammer.is_alive() is False:
                print("warning: the hammer ended before the loaded phase did; raise --seconds")
            client_codes = results.get(timeout=ns.seconds + 60)
            hammer.join(30)
        streams = server_codes(server.metrics_url, "ScoreStream")
        scores = server_codes(server.metrics_url, "Score")
    finally:
        server.stop()
    print(f"Score, {ns.tokens} tokens x 576 f32, n={ns.n} per phase; max_streams={ns.max_streams} (ms)")
    print(f"{'phase':38} {'p50':>8} {'p99':>8}")
    print(f"{'unloaded (peer)':38} {pct(unloaded, 50):8.3f} {pct(unloaded, 99):8.3f}")
    label = f"idle + abandoned streams ({ns.holders} idle, {ns.abusers} abandoning)"
    print(f"{label:38} {pct(loaded, 50):8.3f} {pct(loaded, 99):8.3f}")
    print(f"loaded / unloaded p99 = {pct(loaded, 99) / pct(unloaded, 99):.2f} (goal <= 3)")
    base = rss[0]
    spread = max(abs(r - base) / base for r in rss)
    print(
        f"sidecar RSS after warm-up: {base / 1024:.1f} MiB, samples {[round(r / 1024, 1) for r in rss]} MiB, "
        f"max deviation {100 * spread:.1f} % (goal <= 10 %)"
    )
    print(f"ScoreStream outcomes, client saw: {client_codes}")
    print(f"ScoreStream outcomes, server counted: {dict(streams)}")
    print(f"Score outcomes, server counted: {dict(scores)} (sent {ns.n * 2 + 200})")


if __name__ == "__main__":
    main()
