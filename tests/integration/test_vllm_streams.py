"""``SidecarStreams`` (the adapter's network side) against a real sidecar on loopback, no vLLM."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from monitor.client import Generation, MonitorClient
from monitor.integrations.vllm._streams import SidecarStreams
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, always_firing_bundle, config, free_port


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, D_MODEL)).astype(np.float32)


def test_rows_pushed_per_step_give_the_verdict_of_one_score(sidecar: ServerThread) -> None:
    streams = SidecarStreams(sidecar.target, model=MODEL, decode=lambda ids: " ".join(map(str, ids)))
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
    streams = SidecarStreams(sidecar.target, model=MODEL, max_queued_rows=10)
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
    streams = SidecarStreams(f"127.0.0.1:{free_port()}", model=MODEL)
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

    streams = SidecarStreams(sidecar.target, model=MODEL, on_halt=on_halt)
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
    streams = SidecarStreams(sidecar.target, model=MODEL)
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
