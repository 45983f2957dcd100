"""Runs tests/vllm (the connector's unit tests on vLLM's real types) in vLLM's own environment."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from monitor.harness.vllm import REPO

pytestmark = pytest.mark.integration


def test_connector_unit_tests_pass_in_vllms_environment(vllm_python: Path) -> None:
    cmd = [str(vllm_python), "-m", "pytest", "tests/vllm", "-q", "-o", "addopts=", "--confcutdir=tests/vllm"]
    cmd += ["-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-8000:]
    assert " passed" in out and " failed" not in out, out[-2000:]
