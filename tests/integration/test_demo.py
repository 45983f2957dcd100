"""`monitor demo` end to end: real model, real sidecar, real /metrics read-back."""

import re
import subprocess
import sys


def test_demo_streams_real_generations_and_reads_back_metrics() -> None:
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "monitor",
            "demo",
            "--requests",
            "2",
            "--max-new-tokens",
            "12",
            "--chunk-tokens",
            "4",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={"COLUMNS": "200", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", **_keep_env()},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 generations monitored" in r.stdout
    chunks = re.search(r"safety_monitor_stream_chunks_total = (\d+)", r.stdout)
    tokens = re.search(r"safety_monitor_tokens_scored_total\{hook_point=blocks.16.hook_resid_post\} = (\d+)", r.stdout)
    assert chunks and tokens, r.stdout
    # 12 new tokens at most per generation, at least one chunk of 4 each.
    assert 2 <= int(chunks.group(1)) <= 8 and 2 <= int(tokens.group(1)) <= 24
    assert "safety_monitor_generations_scored_total{rpc=ScoreStream} = 2" in r.stdout


def _keep_env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k in ("HOME", "PATH", "SAFETY_MONITOR_CACHE", "PYTHONPATH")}
