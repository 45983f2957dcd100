"""kill -9 mid-burst: nothing acknowledged is missing from the audit log; drift loses at most the
save interval. The sidecar runs as a real `monitor serve` process on 127.0.0.1."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from tests.conftest import D_MODEL, HOOK, MODEL, ServeProcess

SAVE_SECONDS = 0.5
SLACK = 0.5  # writing the state file itself takes time; the bound is interval + this


def item(rid: str, x: np.ndarray) -> pb.ScoreRequest:
    t = pb.Tensor(shape=list(x.shape), dtype=pb.DTYPE_F32, data=x.tobytes())
    return pb.ScoreRequest(
        request_id=rid, model=MODEL, output="fine", activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)]
    )


def drift_events(path: Path) -> int:
    return int(json.loads(path.read_text())["events"]) if path.exists() else 0


def audit_ids(path: Path) -> tuple[set[str], int]:
    """Request ids on disk, and the number of lines that are not whole JSON (torn by the kill)."""
    ids, torn = set(), 0
    for line in path.read_text().splitlines():
        try:
            ids.add(json.loads(line)["request_id"])
        except ValueError:
            torn += 1
    return ids, torn


class Burst:
    """Three threads sending Ingest calls of 16 items until stopped; records what was acknowledged."""

    def __init__(self, target: str, kill: int, x: np.ndarray) -> None:
        self.target, self.kill, self.x = target, kill, x
        self.acked: list[tuple[float, list[str]]] = []
        self.failed_calls = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(w,)) for w in range(3)]
        for t in self._threads:
            t.start()

    def _run(self, worker: int) -> None:
        with grpc.insecure_channel(self.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            i = 0
            while not self._stop.is_set():
                ids = [f"k{self.kill}-w{worker}-{i}-{j}" for j in range(16)]
                try:
                    summary = stub.Ingest(iter([item(r, self.x) for r in ids]), timeout=10)
                except grpc.RpcError:
                    with self._lock:
                        self.failed_calls += 1
                    return
                assert summary.accepted == len(ids)
                with self._lock:
                    self.acked.append((time.monotonic(), ids))
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(15)


def test_kill9_mid_burst_loses_nothing_acknowledged(tmp_path: Path) -> None:
    audit, state = tmp_path / "audit.jsonl", tmp_path / "drift.json"
    rng = random.Random(5)
    x = np.random.default_rng(0).normal(size=(4, D_MODEL)).astype(np.float32)
    total_acked = 0
    for kill in range(5):
        events_before = drift_events(state)
        server = ServeProcess(
            "--audit-log",
            str(audit),
            "--drift-state",
            str(state),
            log_path=tmp_path / "server.log",
            env={"SAFETY_MONITOR_DRIFT_SAVE_SECONDS": str(SAVE_SECONDS)},
        ).wait()
        burst = Burst(server.target, kill, x)
        time.sleep(rng.uniform(1.0, 2.0))
        killed_at = time.monotonic()
        server.kill9()
        burst.stop()
        acked = burst.acked
        assert burst.failed_calls >= 1, "the kill should land mid-burst (some calls cut off)"
        assert acked, "the burst acknowledged nothing before the kill"

        on_disk, torn = audit_ids(audit)
        missing = [r for _, ids in acked for r in ids if r not in on_disk]
        assert missing == [], f"kill {kill}: {len(missing)} acknowledged items missing from the audit log"
        assert torn <= kill + 1  # at most one torn line per kill, from an unacknowledged record

        saved = drift_events(state) - events_before
        old_enough = sum(len(ids) for t, ids in acked if t <= killed_at - SAVE_SECONDS - SLACK)
        this_run = sum(len(ids) for _, ids in acked)
        assert saved >= old_enough, (
            f"kill {kill}: drift state kept {saved} events, {old_enough} were older than the interval"
        )
        assert saved <= this_run + 3 * 16  # never more than was scored (in-flight calls included)
        total_acked += this_run
        print(
            f"kill {kill}: {this_run} acknowledged, 0 missing, {torn} torn lines so far; "
            f"drift kept {saved} of {this_run} events ({old_enough} were older than the interval)"
        )
    assert total_acked > 5 * 16


def test_sigterm_on_a_full_disk_exits_zero_keeps_the_saved_state(tmp_path: Path) -> None:
    """SIGTERM when the disk is full: the final drift save fails with a real ENOSPC (its temp file
    is a link to /dev/full); the sidecar logs one line, closes the audit log, exits 0, keeps the
    state saved before and leaves no temp file behind."""
    audit, state, log = tmp_path / "audit.jsonl", tmp_path / "drift.json", tmp_path / "server.log"
    x = np.ones((4, D_MODEL), np.float32)
    env = {"SAFETY_MONITOR_DRIFT_SAVE_SECONDS": "3600"}  # only the shutdown save runs

    def run(prefix: str) -> int:
        server = ServeProcess("--audit-log", str(audit), "--drift-state", str(state), log_path=log, env=env).wait()
        with grpc.insecure_channel(server.target) as ch:
            summary = pb_grpc.SafetyMonitorStub(ch).Ingest(iter([item(f"{prefix}-{i}", x) for i in range(8)]))
        assert summary.accepted == 8
        return server.stop()

    assert run("first") == 0
    saved = state.read_bytes()
    assert json.loads(saved)["events"] == 8
    tmp = tmp_path / "drift.json.tmp"
    tmp.symlink_to("/dev/full")  # writing the next state fails: "No space left on device"

    assert run("second") == 0
    text = log.read_text()
    assert "Traceback" not in text
    lines = [ln for ln in text.splitlines() if "could not save" in ln]
    assert len(lines) == 1 and "at shutdown (No space left on device)" in lines[0], lines
    assert text.rstrip().endswith("stopped")  # the whole stop path ran, audit close included
    assert state.read_bytes() == saved
    assert not tmp.exists() and not tmp.is_symlink()
    ids, torn = audit_ids(audit)
    assert torn == 0 and ids == {f"{p}-{i}" for p in ("first", "second") for i in range(8)}


CORRUPT_STATE = '{"version": 1, "metrics": {"tokens": {"reference": "abc", "reference_frozen": true, "window": []}}}'


def test_a_corrupt_drift_state_is_moved_aside_and_scoring_works(tmp_path: Path) -> None:
    """The state that used to load and then make every Score INTERNAL and /metrics HTTP 500."""
    state, log = tmp_path / "drift.json", tmp_path / "server.log"
    state.write_text(CORRUPT_STATE)
    server = ServeProcess("--drift-state", str(state), log_path=log).wait()
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            replies = [stub.Score(item(f"c-{i}", np.ones((4, D_MODEL), np.float32)), timeout=30) for i in range(5)]
        assert [r.request_id for r in replies] == [f"c-{i}" for i in range(5)]
        with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
        assert "safety_monitor_drift_state_corrupt_total 1.0" in text
    finally:
        assert server.stop() == 0
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("drift.json.corrupt-")]
    assert len(moved) == 1 and moved[0].read_text() == CORRUPT_STATE
    assert json.loads(state.read_text())["events"] == 5  # the fresh state was saved at shutdown
    lines = [ln for ln in log.read_text().splitlines() if "moved aside" in ln]
    assert len(lines) == 1 and "metrics.tokens.reference: expected a valid list, got 'abc'" in lines[0]
    assert "Traceback" not in log.read_text()


def test_strict_drift_state_refuses_a_truncated_file_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    state.write_text('{"version": 1, "metrics": {"tok')
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "serve", "--drift-state", str(state), "--drift-state-strict"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    prefix = f"monitor serve: drift_state: drift state {state}: expected a JSON object, got unreadable JSON"
    assert r.stderr.startswith(prefix)
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert state.read_text() == '{"version": 1, "metrics": {"tok'
