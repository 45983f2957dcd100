"""The k8s manifests and the image run as written: their args parse with the real CLI, the
sidecar binds an address the kubelet's probes reach, and the image can find data/."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from monitor.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("manifest", ["sidecar.yaml", "vllm-sidecar.yaml"])
def test_sidecar_container_is_reachable_by_its_probes(manifest: str) -> None:
    docs = list(yaml.safe_load_all((REPO / "deploy/k8s" / manifest).read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    secret = next(d for d in docs if d["kind"] == "Secret")
    pod = deployment["spec"]["template"]["spec"]
    sidecar = next(c for c in pod["containers"] if c["name"] == "safety-monitor")
    ns = build_parser().parse_args(sidecar["args"])
    assert ns.command == "serve"
    # probes connect to the pod IP: a loopback-only bind would fail every one of them
    assert ns.host == "0.0.0.0" and ns.metrics_host == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == 50051, probe
    env = {e["name"]: e for e in sidecar["env"]}
    token_ref = env["SAFETY_MONITOR_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token_ref["name"] == secret["metadata"]["name"] and token_ref["key"] in secret["stringData"]
    assert pod["terminationGracePeriodSeconds"] > 30  # > drain_seconds


def test_image_installs_editable_from_a_copy_that_has_data() -> None:
    lines = (REPO / "deploy/Dockerfile").read_text()
    assert "COPY data ./data" in lines and "pip install --no-cache-dir -e '.[model]'" in lines
    assert (REPO / "data/demo/prompts.jsonl").is_file()
