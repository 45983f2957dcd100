"""Drift through the real sidecar: alarms in /metrics, a baseline file, and a restart that keeps it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from monitor.client import Generation, MonitorClient
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, config, sample

REF = 60  # reference events per statistic in these tests (production default: 2000)


def answer(words: int, rng: np.random.Generator) -> str:
    vocab = ["the", "model", "answers", "questions", "about", "rivers", "and", "mountains", "clearly"]
    return " ".join(rng.choice(vocab, size=words)) + "."


def send(client: MonitorClient, n: int, words: int, rng: np.random.Generator, start: int = 0) -> None:
    acts = np.ones((2, D_MODEL), np.float32)
    for i in range(n):
        gen = Generation(f"g{start + i}", MODEL, "Tell me about rivers.", answer(words, rng), {HOOK: acts})
        client.score(replace(gen, decision={HOOK: acts[:1]}))  # the deception detectors read the decision row


def test_length_drift_raises_the_alarm_and_a_change_point(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    st = ServerThread(config(drift_reference_events=REF, drift_window_events=100))
    try:
        with MonitorClient(st.target) as client:
            send(client, REF + 100, 150, rng)
            m = st.metrics()
            assert sample(m, "safety_monitor_drift_reference_events", metric="text.words") == REF
            assert sample(m, "safety_monitor_drift_alarm", metric="text.words") == 0
            send(client, 100, 400, rng, start=1000)
            m = st.metrics()
    finally:
        st.stop()
    assert sample(m, "safety_monitor_drift_alarm", metric="text.words") == 1
    assert sample(m, "safety_monitor_drift", metric="text.words", test="psi") > 1.0
    assert sample(m, "safety_monitor_drift", metric="text.words", test="wasserstein") > 200
    assert sample(m, "safety_monitor_drift_change_points_total", metric="text.words", direction="up") >= 1
    # every detector's probability and fire rate is tracked too
    assert sample(m, "safety_monitor_drift_reference_events", metric="detector.deceptive_setup.ensemble.fired") == REF
    assert sample(m, "safety_monitor_text_statistic_count", stat="words") == REF + 200


def test_drift_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    rng = np.random.default_rng(1)
    cfg = config(drift_state=str(state), drift_reference_events=REF, drift_window_events=100)
    st = ServerThread(cfg)
    try:
        with MonitorClient(st.target) as client:
            send(client, REF + 20, 150, rng)
    finally:
        st.stop()
    saved = json.loads(state.read_text())
    assert len(saved["metrics"]["text.words"]["reference"]) == REF and saved["events"] == REF + 20
    st = ServerThread(cfg)  # a new process-equivalent: nothing in memory
    try:
        m = st.metrics()
        assert sample(m, "safety_monitor_drift_reference_events", metric="text.words") == REF
        assert sample(m, "safety_monitor_drift_window_events", metric="text.words") == 20
        with MonitorClient(st.target) as client:  # the old reference judges new traffic
            send(client, 100, 400, rng, start=500)
        m = st.metrics()
        assert sample(m, "safety_monitor_drift_alarm", metric="text.words") == 1
    finally:
        st.stop()


def test_baseline_command_builds_the_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    traffic = tmp_path / "traffic.jsonl"
    traffic.write_text("".join(json.dumps({"prompt": "Q?", "output": answer(150, rng)}) + "\n" for _ in range(80)))
    out = tmp_path / "baseline.json"
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "baseline", "--traffic", str(traffic), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "baseline of 80 responses" in r.stdout
    st = ServerThread(config(drift_baseline=str(out), drift_window_events=100))
    try:
        assert sample(st.metrics(), "safety_monitor_drift_reference_events", metric="text.words") == 80
        with MonitorClient(st.target) as client:
            send(client, 100, 400, rng)
        assert sample(st.metrics(), "safety_monitor_drift_alarm", metric="text.words") == 1
    finally:
        st.stop()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no output"}\n')
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "baseline", "--traffic", str(bad), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "bad.jsonl:1: expected a JSON object with 'output'" in r.stderr
