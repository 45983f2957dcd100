"""Start-up errors of a real `monitor serve`: one line on stderr naming the file and the field,
exit status 2, never a traceback (ports in use, bad TLS files, an audit log that cannot be
appended to, broken bundle files, a YAML alias bomb)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from monitor.detectors import default_bundle_path
from tests.certs import TestCA

BOMB = "".join(
    f"{name}: &{name} [{', '.join([prev] * 9)}]\n"
    for name, prev in zip("abcdef", ['"lol"', "*a", "*b", "*c", "*d", "*e"], strict=True)
)


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "monitor", "serve", "--port", "0", "--metrics-port", "0", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})})


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The error line, after checking the contract: exit 2, exactly one line, no traceback."""
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1, r.stderr[-2000:]
    assert r.stderr.startswith("monitor serve: ")
    return r.stderr.strip()


@pytest.fixture
def listening() -> Iterator[int]:
    """A port someone else is listening on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_grpc_port_in_use(listening: int) -> None:
    line = one_line_error(serve("--port", str(listening)))
    assert line == f"monitor serve: port: cannot bind gRPC to 127.0.0.1:{listening}: Address already in use"


def test_metrics_port_in_use(listening: int) -> None:
    line = one_line_error(serve("--metrics-port", str(listening)))
    assert line == (
        f"monitor serve: metrics_port: cannot serve /metrics on 127.0.0.1:{listening}: Address already in use"
    )


def test_tls_files_that_are_not_pem_are_named(tmp_path: Path) -> None:
    ca = TestCA(tmp_path, "main")
    good, other = ca.issue("sidecar", server=True), ca.issue("other", server=True)
    junk = tmp_path / "junk.pem"
    junk.write_text("this is not a certificate\n")
    line = one_line_error(serve("--tls-cert", str(junk), "--tls-key", good.key))
    assert line.startswith(f"monitor serve: tls_cert: expected a PEM certificate chain, got '{junk}'")
    line = one_line_error(serve("--tls-cert", good.cert, "--tls-key", other.key))
    assert line == (
        f"monitor serve: tls_key: expected the PEM private key of tls_cert, got '{other.key}' (KEY_VALUES_MISMATCH)"
    )
    line = one_line_error(serve("--tls-cert", good.cert, "--tls-key", good.key, "--tls-client-ca", str(junk)))
    assert line.startswith(f"monitor serve: tls_client_ca: expected PEM CA certificates, got '{junk}'")


def test_an_audit_log_that_cannot_be_appended_to(tmp_path: Path) -> None:
    line = one_line_error(serve("--audit-log", str(tmp_path)))
    expected = "monitor serve: audit_log: expected a file that can be appended to, got"
    assert line == f"{expected} '{tmp_path}' (Is a directory)"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "logs" / "audit.jsonl"
    line = one_line_error(serve("--audit-log", str(target)))
    assert line == f"{expected} '{target}' (Not a directory)"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory")
def test_an_audit_log_in_an_unwritable_directory(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    line = one_line_error(serve("--audit-log", str(locked / "audit.jsonl")))
    assert line.endswith("(Permission denied)") and "audit_log: expected a file that can be appended to" in line


def _truncate(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


BUNDLE_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "garbage detectors.safetensors": (
        lambda b: (b / "detectors.safetensors").write_bytes(b"garbage\n" * 4),
        "{b}/detectors.safetensors: expected a safetensors file of probe weights, unreadable: ",
    ),
    "truncated detectors.safetensors": (
        lambda b: _truncate(b / "detectors.safetensors", 5000),
        "{b}/detectors.safetensors: expected a safetensors file of probe weights, unreadable: ",
    ),
    "truncated sae.safetensors": (
        lambda b: _truncate(b / "sae" / "sae.safetensors", 100_000),
        "{b}/sae/sae.safetensors: expected a safetensors file of SAE weights, unreadable: ",
    ),
    "truncated detectors.features.json": (
        lambda b: _truncate(b / "detectors.features.json", 1000),
        "{b}/detectors.features.json: expected a JSON object of feature reports, unreadable: ",
    ),
    "sae.json is a list": (
        lambda b: (b / "sae" / "sae.json").write_text("[]"),
        "{b}/sae/sae.json: expected a JSON object, got list []",
    ),
    "bundle.yaml is a list": (
        lambda b: (b / "bundle.yaml").write_text("- name: x\n"),
        "{b}/bundle.yaml: expected a mapping of keys, got list [{{'name': 'x'}}]",
    ),
    "bundle.yaml alias bomb": (
        lambda b: (b / "bundle.yaml").write_text(BOMB + "format_version: *f\n"),
        "{b}/bundle.yaml: not valid YAML: expected at most 200000 nodes with aliases expanded, got more",
    ),
}


@pytest.mark.parametrize("damage", list(BUNDLE_DAMAGE))
def test_a_broken_bundle_file_is_named(tmp_path: Path, damage: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(default_bundle_path(), bundle)
    breaks, expected = BUNDLE_DAMAGE[damage]
    breaks(bundle)
    line = one_line_error(serve("--bundle", str(bundle)))
    assert line.startswith("monitor serve: " + expected.format(b=bundle)), line
    assert len(line) < 400


def test_a_yaml_alias_bomb_in_the_config_gives_a_short_error(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(BOMB + "port: *f\n")
    assert len(config.read_bytes()) < 500
    line = one_line_error(serve("--config", str(config)))
    assert line == (
        f"monitor serve: config file {config}: not valid YAML: "
        "expected at most 200000 nodes with aliases expanded, got more"
    )


def test_a_mistyped_safety_monitor_variable_stops_the_start() -> None:
    """``SAFETY_MONITOR_AUTH_TOKN`` used to be ignored: the sidecar served without auth."""
    line = one_line_error(serve(env={"SAFETY_MONITOR_AUTH_TOKN": "s3cret"}))
    assert line.startswith(
        "monitor serve: environment 'SAFETY_MONITOR_AUTH_TOKN': unknown variable "
        "(did you mean SAFETY_MONITOR_AUTH_TOKEN?)"
    )
