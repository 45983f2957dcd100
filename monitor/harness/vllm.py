"""Start ``vllm serve`` (the OpenAI-compatible API server) beside a sidecar, from another Python.

vLLM lives in its own environment (``make install-vllm`` builds ``.venv-vllm``); the sidecar, the
demo, the tests and the bench run in the project's. This module starts the server as a child
process with the settings measured to work on CPU (docs/vllm.md), waits for ``/health`` and stops
it. It never imports vLLM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

from monitor.integrations.vllm._settings import ENV_PREFIX

__all__ = ["VllmServer", "find_vllm_python", "vllm_env"]

REPO = Path(__file__).resolve().parents[2]


def find_vllm_python() -> Path:
    """The Python of vLLM's environment: ``$SAFETY_MONITOR_VLLM_PYTHON`` or ``.venv-vllm/bin/python``."""
    env = os.environ.get(ENV_PREFIX + "VLLM_PYTHON")
    path = Path(env) if env else REPO / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        raise FileNotFoundError(
            f"vLLM python: expected {path} (run `make install-vllm`, or set {ENV_PREFIX}VLLM_PYTHON), file missing"
        )
    return path


def vllm_env(workdir: Path, sidecar: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a vLLM child on CPU: its caches and sockets under ``workdir``, offline.

    ``sidecar`` switches the adapter on (the plugin reads ``SAFETY_MONITOR_SIDECAR``); without it
    vLLM loads no plugin at all, so "off" is plain vLLM.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(
        {
            "HF_HUB_OFFLINE": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default fails the memory check on small machines
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",  # the default reserves one of two cores (165 -> 250 tok/s)
            "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
            "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
            "TMPDIR": str(workdir),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
        }
    )
    if sidecar:
        env[ENV_PREFIX + "SIDECAR"] = sidecar
    else:
        env["VLLM_PLUGINS"] = "none"  # load no general plugin: the baseline is vLLM as shipped
    env.update(extra or {})
    return env


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` as a child process on 127.0.0.1."""

    def __init__(
        self,
        model_dir: Path,
        *,
        port: int,
        workdir: Path,
        served_name: str,
        sidecar: str | None = None,
        args: Sequence[str] = ("--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"),
        env: Mapping[str, str] | None = None,
        python: Path | None = None,
    ) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "vllm.log"
        cmd = [
            str(python or find_vllm_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",  # `vllm serve` itself fails on the vllm-cpu package name
            "--model",
            str(model_dir),
            "--served-model-name",
            served_name,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            *args,
        ]
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            cmd, env=vllm_env(workdir, sidecar, env), stdout=self._log, stderr=subprocess.STDOUT, cwd=workdir
        )

    def wait_ready(self, timeout: float = 300.0) -> VllmServer:
        """Block until ``/health`` answers 200; raise with the log's tail if the server died."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vllm serve not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``; the engine's child processes go with it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def __enter__(self) -> VllmServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
