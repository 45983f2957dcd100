"""The vLLM adapter's parts that need no vLLM: settings, engine arguments, and the thin install."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.architectures import ArchitectureError
from monitor.integrations.vllm import AdapterSettings, engine_config, vllm_layer_ids
from monitor.integrations.vllm._settings import CONNECTOR_NAME, external_id

REPO = Path(__file__).resolve().parents[2]


def test_settings_extra_config_wins_over_env() -> None:
    env = {"SAFETY_MONITOR_SIDECAR": "env:1", "SAFETY_MONITOR_PROJECTED": "false", "SAFETY_MONITOR_HALT": "0"}
    s = AdapterSettings.from_sources({"sidecar": "extra:2"}, env)
    assert (s.sidecar, s.projected, s.halt) == ("extra:2", False, False)
    s = AdapterSettings.from_sources(
        None, {**env, "SAFETY_MONITOR_HOOK_POINTS": "blocks.3.hook_resid_post, blocks.16.hook_resid_post"}
    )
    assert s.hook_points == ("blocks.3.hook_resid_post", "blocks.16.hook_resid_post")
    assert AdapterSettings.from_sources(s.extra_config(), {}) == s  # what the engine ships to workers round-trips


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({}, "sidecar"),
        ({"sidecar": "h:1", "projected": "maybe"}, "projected"),
        ({"sidecar": "h:1", "hook_points": ["layer16"]}, "hook_point"),
        ({"sidecar": "h:1", "max_queued_rows": 0}, "max_queued_rows"),
    ],
)
def test_bad_settings_name_the_field(extra: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        AdapterSettings.from_sources(extra, {})


def test_engine_config_uses_vllm_layer_ids() -> None:
    """vLLM counts aux hidden states from the embeddings: blocks.16 (layers[16]'s output) is id 17."""
    s = AdapterSettings(sidecar="h:1", hook_points=("blocks.16.hook_resid_post", "blocks.20.hook_resid_post"))
    cfg = engine_config(s)
    assert vllm_layer_ids(s.hook_points) == [17, 21]
    assert cfg["speculative_config"]["method"] == "extract_hidden_states"
    assert cfg["speculative_config"]["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [17, 21]
    assert cfg["kv_transfer_config"]["kv_connector"] == CONNECTOR_NAME
    assert cfg["kv_transfer_config"]["kv_connector_extra_config"]["sidecar"] == "h:1"
    with pytest.raises(ValueError, match="hook_points"):
        engine_config(AdapterSettings(sidecar="h:1"))


def test_engine_config_orders_hook_points_as_vllm_returns_them_and_checks_the_family() -> None:
    """vLLM sorts and de-duplicates the aux layer ids and stacks the rows in that order; the
    connector indexes the rows by its hook_points, so both must be in ascending layer order."""
    hps = ("blocks.20.hook_resid_post", "blocks.3.hook_resid_post", "blocks.20.hook_resid_post")
    cfg = engine_config(AdapterSettings(sidecar="h:1", hook_points=hps), "Qwen2ForCausalLM")
    assert cfg["speculative_config"]["draft_model_config"]["hf_config"]["eagle_aux_hidden_state_layer_ids"] == [4, 21]
    extra = cfg["kv_transfer_config"]["kv_connector_extra_config"]
    assert extra["hook_points"] == ["blocks.3.hook_resid_post", "blocks.20.hook_resid_post"]
    assert vllm_layer_ids(["blocks.3.hook_resid_post"], "MistralForCausalLM") == [4]
    with pytest.raises(ArchitectureError, match=r"^architecture 'Gemma2ForCausalLM': vLLM 0\.32's native"):
        engine_config(AdapterSettings(sidecar="h:1", hook_points=hps), "Gemma2ForCausalLM")
    with pytest.raises(ArchitectureError, match=r"^architecture 'PhiForCausalLM': expected one of LlamaForCausalLM"):
        vllm_layer_ids(["blocks.3.hook_resid_post"], "PhiForCausalLM")


def test_external_id_strips_only_the_engine_suffix() -> None:
    assert external_id("chatcmpl-abc-0123abcd") == "chatcmpl-abc"
    assert external_id("7") == "7"
    assert external_id("req-XYZ12345") == "req-XYZ12345"  # not hex: not vLLM's suffix


def test_client_and_plugin_import_no_torch_and_no_server_module() -> None:
    """`import monitor.client` and the plugin's module stay thin (a fresh interpreter checks)."""
    code = (
        "import sys, json, monitor.client, monitor.integrations.vllm;print(json.dumps(sorted(m for m in sys.modules)))"
    )
    mods = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    heavy = ("torch", "transformers", "yaml", "pydantic", "pydantic_settings", "prometheus_client", "sklearn", "onnx")
    heavy += ("safetensors", "vllm")
    server = (
        "monitor.pipeline",
        "monitor.server",
        "monitor.detectors",
        "monitor.drift",
        "monitor.sae",
        "monitor.text",
        "monitor.critique",
        "monitor.metrics",
        "monitor.audit",
    )
    loaded = [m for m in mods if m.split(".")[0] in heavy or m.startswith(server)]
    assert loaded == []


def test_base_install_pulls_grpcio_protobuf_numpy_only(tmp_path: Path) -> None:
    """`pip install .` (no extras) resolves to the thin client's three dependencies (and theirs)."""
    report = tmp_path / "report.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--no-deps",
            "--quiet",
            "--report",
            str(report),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    item = json.loads(report.read_text())["install"][0]
    requires = [r for r in item["metadata"].get("requires_dist", []) if "extra ==" not in r]
    names = sorted(r.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip().lower() for r in requires)
    assert names == ["grpcio", "numpy", "protobuf"]
    extras = item["metadata"].get("provides_extra", [])
    assert {"server", "model", "vllm", "dev"} <= set(extras)


def test_vllm_pod_manifest_hangs_together() -> None:
    """deploy/k8s/vllm-sidecar.yaml: vLLM reaches the sidecar's gRPC port over loopback, both read
    the same token, and the sidecar binds an address the kubelet's probes can reach."""
    import yaml

    deployment, secret = yaml.safe_load_all((REPO / "deploy/k8s/vllm-sidecar.yaml").read_text())
    spec = deployment["spec"]["template"]["spec"]
    vllm, sidecar = (next(c for c in spec["containers"] if c["name"] == n) for n in ("vllm", "safety-monitor"))
    venv = {e["name"]: e for e in vllm["env"]}
    host, port = venv["SAFETY_MONITOR_SIDECAR"]["value"].split(":")
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert host == "127.0.0.1" and int(port) == ports["grpc"]
    assert sidecar["args"][sidecar["args"].index("--host") + 1] == "0.0.0.0"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert sidecar[probe]["grpc"]["port"] == ports["grpc"]
    senv = {e["name"]: e for e in sidecar["env"]}
    ref_v = venv["SAFETY_MONITOR_TOKEN"]["valueFrom"]["secretKeyRef"]
    ref_s = senv["SAFETY_MONITOR_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref_v == ref_s and ref_v["name"] == secret["metadata"]["name"] and ref_v["key"] in secret["stringData"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])
