"""``SidecarStreams`` (the adapter's network side) against a real sidecar on loopback, no vLLM."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1.health_pb2 import HealthCheckRequest
from grpc_health.v1.health_pb2_grpc import HealthStub

from monitor.client import Catalog, Generation, MonitorClient
from monitor.integrations.vllm._streams import SidecarStreams
from tests.conftest import (
    D_MODEL,
    HOOK,
    MODEL,
    ServeProcess,
    ServerThread,
    always_firing_bundle,
    config,
    free_port,
    sample,
)


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, D_MODEL)).astype(np.float32)


def test_rows_pushed_per_step_give_the_verdict_of_one_score(sidecar: ServerThread) -> None:
    streams = SidecarStreams(
        sidecar.target, model=MODEL, decode=lambda ids: " ".join(map(str, ids)), keep_verdicts=4096
    )
    try:
        a, b = rows(7, 1), rows(5, 2)
        streams.open("r-a", [1, 2, 3])
        streams.open("r-b", [4, 5])
        for i in range(7):  # interleaved steps of two requests, as in a continuous batch
            step = {"r-a": {HOOK: a[i : i + 1]}}
            if i < 5:
                step["r-b"] = {HOOK: b[i : i + 1]}
            streams.push(step)
        streams.finish("r-a", [10, 11])
        streams.finish("r-b", [12])
        va, vb = streams.verdict("r-a"), streams.verdict("r-b")
        assert va is not None and vb is not None and va.final and vb.final
        assert (va.tokens_seen, vb.tokens_seen) == (7, 5)
        with MonitorClient(sidecar.target) as client:
            for v, x in ((va, a), (vb, b)):
                ref = {d.detector: d.score for d in client.score(Generation("ref", MODEL, "", "", {HOOK: x})).detectors}
                got = {d.detector: d.score for d in v.detectors}
                assert got.keys() == ref.keys()
                assert max(abs(got[k] - ref[k]) for k in ref) < 1e-6
        st = streams.stats
        assert (st.requests, st.finished, st.failed, st.rows_sent, st.rows_dropped) == (2, 2, 0, 12, 0)
    finally:
        streams.close()


def test_rows_over_the_queue_bound_are_dropped_and_counted(sidecar: ServerThread) -> None:
    streams = SidecarStreams(sidecar.target, model=MODEL, max_queued_rows=10, keep_verdicts=4096)
    try:
        streams.open("a", [])
        streams.open("b", [])
        streams.push({"a": {HOOK: rows(8, 1)}, "b": {HOOK: rows(8, 2)}})  # b does not fit beside a
        streams.finish("a", [])
        streams.finish("b", [])
        va, vb = streams.verdict("a"), streams.verdict("b")
        assert va is not None and va.tokens_seen == 8
        assert vb is None  # every row of b was dropped: unmonitored, and counted so
        st = streams.stats
        assert (st.rows_sent, st.rows_dropped, st.failed, st.finished) == (8, 8, 1, 1)
    finally:
        streams.close()


def test_a_sidecar_that_is_down_costs_the_engine_nothing(tmp_path: Path) -> None:
    streams = SidecarStreams(f"127.0.0.1:{free_port()}", model=MODEL, keep_verdicts=4096)
    try:
        streams.open("x", [])
        for _ in range(200):  # each push is a lock and a hand-off (timed in bench/non_blocking.py)
            streams.push({"x": {HOOK: rows(1, 0)}})
        streams.finish("x", [])
        assert streams.verdict("x", timeout=30) is None
        st = streams.stats
        assert st.failed == 1 and st.rows_sent == 0 and st.rows_dropped == 200
    finally:
        streams.close()


def test_halt_advice_is_reported_once(tmp_path: Path) -> None:
    bundle = always_firing_bundle(tmp_path)
    sidecar = ServerThread(config(bundle=str(bundle)))
    halts: list[tuple[str, str]] = []
    got = threading.Event()

    def on_halt(rid: str, reason: str) -> None:
        halts.append((rid, reason))
        got.set()

    streams = SidecarStreams(sidecar.target, model=MODEL, on_halt=on_halt, keep_verdicts=4096)
    try:
        streams.open("h", [])
        streams.push({}, {"h": {HOOK: rows(1, 99)}})  # the decision row the critical deception detector reads
        for i in range(12):
            streams.push({"h": {HOOK: rows(1, i)}})
        assert got.wait(20)
        streams.finish("h", [])
        v = streams.verdict("h")
        assert v is not None and v.halt
        assert len(halts) == 1 and halts[0][0] == "h" and "fired" in halts[0][1]
        assert streams.stats.halts == 1
    finally:
        streams.close()
        sidecar.stop()


@pytest.mark.parametrize("n", [0, -1])
def test_bad_queue_bound_is_refused(n: int) -> None:
    with pytest.raises(ValueError, match="max_queued_rows"):
        SidecarStreams("127.0.0.1:1", max_queued_rows=n)


def test_the_decision_row_is_sent_once_and_read_by_the_decision_detectors(sidecar: ServerThread) -> None:
    streams = SidecarStreams(sidecar.target, model=MODEL, keep_verdicts=4096)
    try:
        dec, x = rows(1, 7) * 3, rows(6, 8)
        streams.open("d", [1, 2, 3])
        streams.push({}, {"d": {HOOK: dec}})  # the prefill step: only the decision position is final
        for i in range(6):
            streams.push({"d": {HOOK: x[i : i + 1]}})
        streams.finish("d", [9])
        v = streams.verdict("d")
        assert v is not None and v.tokens_seen == 6
        with MonitorClient(sidecar.target) as client:
            with_dec = client.score(Generation("ref", MODEL, "", "", {HOOK: x}, decision={HOOK: dec}))
            without = client.score(Generation("ref2", MODEL, "", "", {HOOK: x}))
        got = {d.detector: d.score for d in v.detectors}
        want = {d.detector: d.score for d in with_dec.detectors}
        assert got.keys() == want.keys() and max(abs(got[k] - want[k]) for k in want) < 1e-6
        # the decision detectors run only on a decision row: the streamed verdict has them
        decision_only = set(want) - {d.detector for d in without.detectors}
        assert {"harmful_request.ensemble", "harmful_compliance"} <= decision_only <= set(got)
    finally:
        streams.close()


# -- faults: every request monitored or counted as not, nothing left behind ------------------------


def one_request(streams: SidecarStreams, rid: str, n: int = 3, seed: int = 0) -> None:
    """What the engine does for a short request: open, one row per step, finish."""
    x = rows(n, seed)
    streams.open(rid, [1, 2])
    for i in range(n):
        streams.push({rid: {HOOK: x[i : i + 1]}})
    streams.finish(rid, [7])


def settled(streams: SidecarStreams) -> None:
    """Every request ended, no row waiting, no task running, and the counters add up."""
    live, st = streams.live(), streams.stats
    assert (live.requests, live.tasks, live.queued_rows) == (0, 0, 0), live
    assert st.requests == st.finished + st.failed, st
    assert st.failed == sum(st.unmonitored.values()) and st.rows_dropped == sum(st.dropped.values())


def serving_since(target: str, timeout: float = 120) -> float:
    """When ``target`` began to serve, to ~20 ms: a fresh channel per probe, so no reconnect
    backoff of the probe's own (``wait_serving``'s one channel can lag by seconds) delays it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with grpc.insecure_channel(target) as ch:
            try:
                HealthStub(ch).Check(HealthCheckRequest(), timeout=0.5)
                return time.monotonic()
            except grpc.RpcError:
                pass
        time.sleep(0.02)
    raise TimeoutError(f"{target} never served")


def test_requests_opened_after_a_sidecar_restart_are_monitored(tmp_path: Path) -> None:
    """kill -9 mid-run, restart on the same port, traffic all along (a request every 0.1 s):
    every request opened once it serves again is monitored. They wait for the reconnect
    (bounded by ``open_timeout``) instead of failing during the client's reconnect backoff."""
    port = free_port()
    first = ServeProcess(port=port, log_path=tmp_path / "first.log").wait()
    second: ServeProcess | None = None
    streams = SidecarStreams(first.target, model=MODEL, keep_verdicts=4096)
    opened: list[tuple[str, float]] = []  # (request, when it was opened)
    stop = threading.Event()

    def engine() -> None:  # the engine keeps serving whatever the sidecar does
        while not stop.is_set():
            rid = f"r-{len(opened)}"
            opened.append((rid, time.monotonic()))
            one_request(streams, rid, seed=len(opened))
            time.sleep(0.1)

    driver = threading.Thread(target=engine)
    try:
        driver.start()
        time.sleep(1.0)
        first.kill9()
        time.sleep(5.0)  # down (plus the restart's own ~3 s): the old 5 s reconnect backoff is reached
        second = ServeProcess(port=port, log_path=tmp_path / "second.log")
        serving = serving_since(second.target)
        while not any(t >= serving for _, t in opened):
            time.sleep(0.005)
        first_after = next(rid for rid, t in opened if t >= serving)
        assert streams.verdict(first_after, timeout=30) is not None
        first_verdict = time.monotonic() - serving
        time.sleep(2.0)
        stop.set()
        driver.join(10)
        got = {rid: streams.verdict(rid, timeout=30) for rid, _ in opened}
        after = [(rid, t - serving) for rid, t in opened if t >= serving]
        missed = [(rid, round(t, 2)) for rid, t in after if got[rid] is None]
        down = [rid for rid, t in opened if t < serving and got[rid] is None]
        print(
            f"\nrestart: {len(after) - len(missed)}/{len(after)} requests opened in the 2 s after serving "
            f"monitored, the first one's final verdict {first_verdict:.2f} s after serving; "
            f"{len(down)} of {len(opened) - len(after)} opened before it served unmonitored"
        )
        assert not missed, f"unmonitored after the sidecar served again: {missed}"
        assert first_verdict < 5  # goal 1 s (docs/vllm.md has the measured figure); generous here
        assert down  # the ones running at the kill, and those opened while it was down for long
        st = streams.stats
        assert st.failed == len(down) and st.unmonitored["adapter_error"] == 0
        settled(streams)
    finally:
        stop.set()
        driver.join(10)
        streams.close()
        if first.proc.poll() is None:
            first.kill9()
        if second is not None:
            second.kill9()


def test_monitoring_starts_when_a_sidecar_that_was_down_at_start_serves() -> None:
    """The engine starts before the sidecar: requests until the catalog arrives are unmonitored
    (counted, rows dropped and counted), later ones are monitored; nothing raises meanwhile."""
    port = free_port()
    streams = SidecarStreams(f"127.0.0.1:{port}", keep_verdicts=4096)
    arrived = threading.Event()
    catalogs: list[str] = []

    def on_catalog(catalog: Catalog) -> None:
        catalogs.append(catalog.model)
        arrived.set()

    sidecar: ServerThread | None = None
    try:
        streams.start_catalog(on_catalog)
        assert not streams.monitoring
        for i in range(2):
            one_request(streams, f"early-{i}", seed=i)
        assert streams.verdict("early-0", timeout=5) is None and streams.verdict("early-1", timeout=5) is None
        streams.open("straddle", [1])  # still running when the catalog comes
        streams.push({"straddle": {HOOK: rows(2, 7)}})
        time.sleep(1.0)  # a few failed fetches
        sidecar = ServerThread(config(port=port))
        serving = time.monotonic()
        assert arrived.wait(30)
        print(f"\ncatalog {time.monotonic() - serving:.2f} s after the sidecar served")
        assert catalogs == [MODEL] and streams.model == MODEL and streams.monitoring
        for i in range(2):
            one_request(streams, f"late-{i}", seed=i)
        streams.open("straddle", [1])  # preempted and re-sent: unmonitored still (its first rows are gone)
        streams.push({"straddle": {HOOK: rows(2, 8)}})
        streams.finish("straddle", [1])
        assert all(streams.verdict(f"late-{i}") is not None for i in range(2))
        assert streams.verdict("straddle") is None
        st = streams.stats
        assert (st.requests, st.finished, st.unmonitored["sidecar_unavailable"]) == (6, 2, 4)
        assert st.dropped["stream_failed"] == 10 and st.rows_sent == 6
        settled(streams)
    finally:
        streams.close()
        if sidecar is not None:
            sidecar.stop()


def test_an_unexpected_error_in_one_stream_is_counted_and_releases_its_rows(sidecar: ServerThread) -> None:
    """Rows of two widths in one chunk make numpy raise ValueError (not a ClientError) while the
    chunk is merged: that request is unmonitored (adapter_error), its rows released; the other
    request is not affected."""
    streams = SidecarStreams(sidecar.target, model=MODEL, keep_verdicts=4096)
    try:
        streams.open("bad", [1])
        streams.open("ok", [1])
        streams.push({"bad": {HOOK: rows(2, 1)}, "ok": {HOOK: rows(2, 2)}})
        streams.push({"bad": {HOOK: rows(2, 3)[:, :100]}, "ok": {HOOK: rows(2, 4)}})  # same chunk (max_delay)
        streams.push({"bad": {HOOK: rows(3, 5)}, "ok": {HOOK: rows(3, 6)}})
        streams.finish("bad", [1])
        streams.finish("ok", [1])
        assert streams.verdict("bad") is None
        ok = streams.verdict("ok")
        assert ok is not None and ok.tokens_seen == 7
        st = streams.stats
        assert (st.requests, st.finished, st.failed, st.unmonitored["adapter_error"]) == (2, 1, 1, 1)
        assert st.rows_sent == 7 and st.dropped["stream_failed"] == 7
        settled(streams)
    finally:
        streams.close()


def test_a_stalled_sidecar_costs_the_request_its_send_deadline(tmp_path: Path) -> None:
    """SIGSTOP: the connection stays up but no verdict comes. After ``send_timeout`` the request
    is unmonitored (send_deadline) and its rows released; once the sidecar runs again, new
    requests are monitored."""
    proc = ServeProcess(log_path=tmp_path / "sidecar.log").wait()
    streams = SidecarStreams(proc.target, model=MODEL, send_timeout=1.0, max_delay=0.1, keep_verdicts=4096)
    try:
        streams.open("s", [1])
        streams.push({"s": {HOOK: rows(2, 1)}})
        deadline = time.monotonic() + 10
        while streams.stats.chunks < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert streams.stats.chunks == 1
        proc.proc.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        streams.push({"s": {HOOK: rows(3, 2)}})
        streams.finish("s", [1])
        assert streams.verdict("s", timeout=10) is None
        waited = time.monotonic() - t0
        print(f"\nstalled sidecar: request unmonitored {waited:.2f} s after its last push (send_timeout 1 s)")
        st = streams.stats
        assert st.unmonitored["send_deadline"] == 1 and st.dropped["stream_failed"] == 3 and st.rows_sent == 2
        assert waited < 8  # the deadline is 1 s; generous for a loaded machine
        settled(streams)
        proc.proc.send_signal(signal.SIGCONT)
        one_request(streams, "after", seed=3)
        assert streams.verdict("after") is not None
    finally:
        proc.proc.send_signal(signal.SIGCONT)
        streams.close()
        proc.kill9()


def test_200_aborted_requests_leave_no_state(tmp_path: Path) -> None:
    """Requests finished early at every point of their stream (before any row, after only the
    decision row, mid-stream, some opened twice as a preempted request is under MRV2): nothing
    stays in the adapter, nor a stream in the sidecar."""
    sidecar = ServerThread(config(max_streams=256))
    streams = SidecarStreams(sidecar.target, model=MODEL, chunk_tokens=2, max_delay=0.05, keep_verdicts=4096)
    rng = np.random.default_rng(0)
    try:
        # continuous batching: 4 new requests join each step; each is aborted after k steps
        # (k = 0: before any row, 1: after only the decision row, more: mid-stream)
        plan: dict[str, tuple[int, int]] = {}  # request -> (abort at step k, steps done)
        opened = 0
        while opened < 200 or plan:
            for _ in range(4 if opened < 200 else 0):
                rid = f"a-{opened}"
                streams.open(rid, [1, 2, 3])
                if opened % 20 == 0:
                    streams.open(rid, [1, 2, 3])  # opened again (preempted and resumed)
                plan[rid] = (int(rng.integers(0, 10)), 0)
                opened += 1
            step = {r: {HOOK: rows(1, d)} for r, (k, d) in plan.items() if 0 < d < k}
            decisions = {r: {HOOK: rows(1, 99)} for r, (k, d) in plan.items() if d == 0 < k}
            streams.push(step, decisions)
            for r, (k, d) in list(plan.items()):
                if d == k:
                    streams.finish(r, [1])  # the client went away
                    del plan[r]
                else:
                    plan[r] = (k, d + 1)
            time.sleep(0.01)
        for i in range(200):
            streams.verdict(f"a-{i}", timeout=30)
        settled(streams)
        st = streams.stats
        assert st.requests == 210 and st.unmonitored["adapter_error"] == 0
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if sample(sidecar.metrics(), "safety_monitor_in_flight_requests", rpc="ScoreStream") == 0:
                break
            time.sleep(0.2)
        assert sample(sidecar.metrics(), "safety_monitor_in_flight_requests", rpc="ScoreStream") == 0
    finally:
        streams.close()
        sidecar.stop()
