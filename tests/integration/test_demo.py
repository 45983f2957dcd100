"""`monitor demo` end to end: sidecar + reference server + real model, verdicts and /metrics read back."""

import os
import re
import subprocess
import sys

import pytest

from monitor.harness.vllm import find_vllm_python


def test_demo_shows_scores_and_a_fired_detector() -> None:
    # The first four demo prompts: three ordinary requests, then a harmful request the model
    # answers with an apology ("I'm sorry for any offense, but ..."), which the refusal detectors flag.
    out = run_demo()
    assert "4 generations monitored" in out
    assert "reference server (OpenAI-compatible) on http://127.0.0.1:" in out
    # scores are shown: one probability cell per behaviour on every request row
    rows = [line for line in out.splitlines() if re.match(r"^│ \d+ +│", line)]
    assert len(rows) == 4
    assert all(len(re.findall(r"\b[01]\.\d\d!?", row)) >= 3 for row in rows)
    # at least one detector fired, and the sidecar counted it
    assert "!" in "".join(rows)
    fired = re.findall(r"safety_monitor_detector_fired_total\{[^}]*detector=refusal\.ensemble[^}]*\} = (\d+)", out)
    assert fired and int(fired[0]) >= 1, out
    assert "safety_monitor_generations_scored_total{rpc=ScoreStream} = 4" in out
    assert "safety_monitor_audit_records_total{result=written} = 4" in out


@pytest.mark.vllm_matrix  # make test-vllm-matrix (a vllm serve start; the adapter is tested in CI elsewhere)
def test_demo_with_vllm_serve_shows_scores() -> None:
    """`make demo-vllm`: the same view, with vLLM (adapter on) as the inference server."""
    try:
        find_vllm_python()
    except FileNotFoundError as exc:
        pytest.skip(f"vLLM environment missing: {exc}")
    out = run_demo("--engine", "vllm")
    assert "vllm serve (OpenAI-compatible, adapter on) on http://127.0.0.1:" in out
    rows = [line for line in out.splitlines() if re.match(r"^│ \d+ +│", line)]
    assert len(rows) == 4
    assert all(len(re.findall(r"\b[01]\.\d\d!?", row)) >= 3 for row in rows)  # verdicts found by completion id
    assert "safety_monitor_generations_scored_total{rpc=ScoreStream} = 4" in out


DEMO_ARGS = ("--requests", "4", "--max-new-tokens", "24", "--metrics-port", "0", "--http-port", "0")


def run_demo(*extra: str) -> str:
    """`monitor demo` on the first four prompts, on free ports; its stdout (exit 0 asserted)."""
    r = subprocess.run(
        [sys.executable, "-m", "monitor", "demo", *extra, *DEMO_ARGS],
        capture_output=True,
        text=True,
        timeout=600,
        env={**_keep_env(), "COLUMNS": "220", "HF_HUB_OFFLINE": "1"},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _keep_env() -> dict[str, str]:
    keep = ("HOME", "PATH", "SAFETY_MONITOR_CACHE", "SAFETY_MONITOR_VLLM_PYTHON", "PYTHONPATH")
    return {k: v for k, v in os.environ.items() if k in keep}
