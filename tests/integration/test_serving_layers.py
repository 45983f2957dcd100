"""Layering of the serving path: no torch, drift recorded once after scoring, drift tied to the bundle."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from monitor.client import Generation, MonitorClient
from monitor.detectors import Bundle
from monitor.drift import DriftMonitor
from monitor.pipeline import ActivationInput, Pipeline, ScoreInput
from monitor.server import SidecarServer
from monitor.tensors import encode
from tests.conftest import D_MODEL, HOOK, MODEL, ServerThread, always_firing_bundle, config

SERVE_AND_LIST_MODULES = """
import json, sys
import numpy as np
from monitor.cli import build_parser
from monitor.client import Generation, MonitorClient
from monitor.config import load_config
from monitor.server import BackgroundSidecar

build_parser()
sidecar = BackgroundSidecar(load_config(env={}, overrides={"port": 0, "metrics_port": 0}))
try:
    with MonitorClient(sidecar.target) as c:
        reply = c.score(Generation("r", MODEL, "Q?", "A.", {HOOK: np.ones((3, D_MODEL), np.float32)}))
    assert reply.detectors, reply
finally:
    sidecar.stop()
print(json.dumps(sorted(sys.modules)))
"""


def test_serving_the_default_bundle_never_imports_torch() -> None:
    """What `monitor serve` runs (config, CLI parser, SidecarServer, a real Score) in a fresh interpreter."""
    consts = f"MODEL, HOOK, D_MODEL = {MODEL!r}, {HOOK!r}, {D_MODEL}\n"
    code = consts + SERVE_AND_LIST_MODULES
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    mods = json.loads(out.stdout.strip().splitlines()[-1])
    heavy = [m for m in mods if m.split(".")[0] in ("torch", "transformers", "onnx", "onnxruntime", "sklearn")]
    assert heavy == []
    assert "monitor.detectors" in mods and "monitor.sae._files" in mods  # it did load and slice the SAE


def acts(n: int = 3) -> dict[str, np.ndarray]:
    return {HOOK: np.ones((n, D_MODEL), np.float32)}


def test_pipeline_score_leaves_drift_alone_and_the_server_records_each_generation_once() -> None:
    pipeline = Pipeline(Bundle.load())
    item = ScoreInput("r", MODEL, "Q?", "A.", [ActivationInput(HOOK, encode(np.ones((3, D_MODEL), np.float32)))])
    for _ in range(5):  # what evaluation and the benches do
        assert pipeline.score(item).change_points == ()
    st = ServerThread(config())
    try:
        assert st.server.drift.events == 0
        with MonitorClient(st.target) as client:
            for i in range(4):
                client.score(Generation(f"s{i}", MODEL, "Q?", "word " * 30, acts()))
            with client.stream("t0", MODEL, prompt="Q?") as stream:
                stream.send(acts(2), "two ")
                stream.send(acts(2), "chunks.", final=True)
        assert st.server.drift.events == 5  # four Score calls and one finished stream; chunks are not events
        assert len(st.server.drift.metrics["text.words"].reference) == 5
    finally:
        st.stop()


def test_drift_state_from_another_bundle_keeps_text_and_restarts_detector_references(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    first = SidecarServer(config(drift_state=str(state)))
    assert first.drift.bundle == first.bundle.identity != ""
    for i in range(30):
        first.drift.update({"text.words": float(i % 7), "detector.deceptive_setup.ensemble.probability": 0.01})
    first.save_drift()
    again = SidecarServer(config(drift_state=str(state)))  # same bundle: everything restored
    assert set(again.drift.metrics) == {"text.words", "detector.deceptive_setup.ensemble.probability"}
    swapped_bundle = always_firing_bundle(tmp_path)  # other thresholds: another identity
    swapped = SidecarServer(config(drift_state=str(state), bundle=str(swapped_bundle)))
    assert swapped.bundle.identity not in ("", first.bundle.identity)
    assert set(swapped.drift.metrics) == {"text.words"}  # detector references start fresh, no false alarm
    assert swapped.drift.metrics["text.words"].reference == first.drift.metrics["text.words"].reference
    assert swapped.drift.bundle == swapped.bundle.identity
    assert DriftMonitor.load(state).bundle == first.bundle.identity
