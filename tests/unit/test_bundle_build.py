"""``monitor bundle build``: its one-line refusals before any long job, and its labeled data.

The CLI checks run ``monitor.cli.main`` on model folders that hold only a config and the default
model's tokenizer (no weights: the preflight must not need them). The data checks feed the default
model's own answers (the files shipped in ``data/``) through the build's data steps and require
the shipped labeled files back, byte for byte: the same builders, for any model.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, Qwen2Config

from monitor.answers import answers_prompt, append_answers, pending, read_prompts
from monitor.architectures import FAMILIES
from monitor.bundling._data import ANSWER_TOKENS, limit_rows, prepare, rebuild
from monitor.detectors._activations import DATA
from monitor.detectors._datasets import compliance_rows, jsonl_text, refusal_rows
from monitor.detectors._ordinary import ORDINARY
from monitor.models import default_model_cache, is_converted, load_default_model
from monitor.sae import SAE, SAEConfig, save, save_saelens

HIDDEN = 192


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    folder = default_model_cache()
    if not is_converted(folder):
        return load_default_model()[1]
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory, tokenizer: Any) -> dict[str, Path]:
    """Config + tokenizer folders (no weights), and SAEs of several kinds."""
    root = tmp_path_factory.mktemp("models")
    out = {name: root / name for name in ("qwen2", "gpt2", "bare")}
    qwen = Qwen2Config(
        hidden_size=HIDDEN, intermediate_size=384, num_hidden_layers=4, num_attention_heads=3, num_key_value_heads=1
    )
    qwen.architectures = ["Qwen2ForCausalLM"]
    qwen.save_pretrained(out["qwen2"])
    tokenizer.save_pretrained(out["qwen2"])
    GPT2Config(n_layer=2, architectures=["GPT2LMHeadModel"]).save_pretrained(out["gpt2"])
    tokenizer.save_pretrained(out["gpt2"])
    qwen.save_pretrained(out["bare"])
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    bare.save_pretrained(out["bare"])
    (out["bare"] / "chat_template.jinja").unlink(missing_ok=True)

    def sae(d_in: int, hook: str, arch: str = "relu", d_sae: int = 64) -> SAE:
        state = {
            "W_enc": torch.zeros(d_in, d_sae),
            "b_enc": torch.zeros(d_sae),
            "W_dec": torch.zeros(d_sae, d_in),
            "b_dec": torch.zeros(d_in),
        }
        return SAE.from_state(SAEConfig(d_in, d_sae, arch, k=8 if arch == "topk" else None, hook_point=hook), state)

    save_saelens(sae(256, "blocks.1.hook_resid_post"), root / "sae-256")
    save_saelens(sae(HIDDEN, "blocks.1.hook_resid_post", "topk"), root / "sae-topk")
    save_saelens(sae(HIDDEN, "blocks.3.hook_resid_post"), root / "sae-layer3")
    save(sae(HIDDEN, "blocks.1.hook_resid_post", d_sae=16), root / "sae-narrow")
    out.update({k: root / k for k in ("sae-256", "sae-topk", "sae-layer3", "sae-narrow")})
    return out


def build(capsys: pytest.CaptureFixture[str], tmp_path: Path, model: Path, *extra: str) -> tuple[int, list[str]]:
    from monitor.cli import main

    args = ["bundle", "build", "--model", str(model), "--out", str(tmp_path / "out"), "--engine", "hf", *extra]
    rc = main(args)
    return rc, capsys.readouterr().err.strip().splitlines()


CASES = {
    "unknown architecture": (
        "gpt2",
        ["--hook-point", "blocks.1.hook_resid_post", "--d-sae", "64"],
        f"architecture 'GPT2LMHeadModel': expected one of {', '.join(FAMILIES)}",
    ),
    "hook point past the last layer": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--hook-point", "blocks.4.hook_resid_post", "--d-sae", "64"],
        "hook_point 'blocks.4.hook_resid_post': the model has layers 0..3",
    ),
    "SAE of another width": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--sae", "{sae-256}"],
        f"sae d_in: 256 differs from the model's hidden size {HIDDEN} (made for another model?)",
    ),
    "TopK SAE": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--sae", "{sae-topk}"],
        "--sae: a TopK SAE cannot be sliced (whether a latent survives depends on all the others), so its SAE "
        "probes could not be served; pass a ReLU or JumpReLU SAE, or train one with --d-sae",
    ),
    "SAE of another hook point": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--sae", "{sae-layer3}"],
        "--sae: the SAE reads blocks.3.hook_resid_post, but the detectors are fitted at the first --hook-point "
        "blocks.1.hook_resid_post; put blocks.3.hook_resid_post first",
    ),
    "SAE too narrow for the probes": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--sae", "{sae-narrow}"],
        "--sae: expected at least 32 latents (the SAE probes use up to 32), got 16",
    ),
    "too few SAE tokens": (
        "qwen2",
        ["--hook-point", "blocks.1.hook_resid_post", "--d-sae", "64", "--sae-tokens", "1000"],
        "--sae-tokens: expected more than --sae-eval-tokens + --sae-batch-size (200000 + 4096), got 1000",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_refuses_in_one_line_before_any_long_job(
    case: str, folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, extra, message = CASES[case]
    extra = [x.format(**{k: str(v) for k, v in folders.items()}) for x in extra]
    rc, err = build(capsys, tmp_path, folders[model], *extra)
    assert rc == 2
    assert err[-1] == f"monitor bundle build: {message}"
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.work").exists()  # nothing started


def test_cli_refuses_a_tokenizer_without_chat_template(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, err = build(capsys, tmp_path, folders["bare"], "--hook-point", "blocks.1.hook_resid_post", "--d-sae", "64")
    assert rc == 2
    assert err[-1].startswith("monitor bundle build: tokenizer: ") and err[-1].endswith(
        "has no chat template; the decision row is the last prompt-template token of the model's own chat template"
    )
    assert not (tmp_path / "out").exists()


def test_limit_keeps_whole_groups_and_both_labels() -> None:
    rows = [
        {"source": s, "group": f"{s}-{g}", "label": lab}
        for s in ("a", "b")
        for g in range(50)
        for lab in ((0, 1) if s == "a" else ((g % 5 == 0),))
    ]
    kept = limit_rows(rows, 12)
    for s in ("a", "b"):
        mine = [r for r in kept if r["source"] == s]
        assert 12 <= len(mine) <= 13 and {int(r["label"]) for r in mine} == {0, 1}
        groups = {r["group"] for r in mine}
        assert all(sum(r["group"] == g for r in rows) == sum(r["group"] == g for r in mine) for g in groups)
    assert [r for r in rows if r in kept] == kept  # file order
    assert limit_rows(rows, 12) == kept and limit_rows(rows, None) == rows


def _default_answers(prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The default model's own answers, as ``monitor bundle build`` would have generated them."""
    ans = [
        {"id": f"refusal/{r['group']}", "prompt": r["prompt"], "response": r["response"], "max_new_tokens": 48}
        for r in map(json.loads, (DATA / "model_responses.jsonl").read_text().splitlines())
    ]
    ans += [
        {"id": f"confusable/{r['group']}", "prompt": r["prompt"], "response": r["response"], "max_new_tokens": 40}
        for r in map(json.loads, (DATA / "confusable_responses.jsonl").read_text().splitlines())
    ]
    ans += [
        {**r, "id": f"ordinary/{r['id']}", "max_new_tokens": 32}
        for r in map(json.loads, (ORDINARY / "answers.jsonl").read_text().splitlines())
    ]
    wanted = {p["id"] for p in prompts}
    assert wanted <= {a["id"] for a in ans}
    return ans


def test_the_default_models_answers_give_back_the_shipped_files(tmp_path: Path) -> None:
    """prepare + rebuild on the default model's answers = data/detectors, byte for byte."""
    prompts = prepare(tmp_path, None, log=lambda s: None)
    (tmp_path / "answers.jsonl").write_text(jsonl_text(_default_answers(prompts)))
    rebuild(tmp_path, tmp_path / "answers.jsonl", prompts, log=lambda s: None)
    for name in ("refusal.jsonl", "harmful_compliance.jsonl", "ordinary.jsonl", "deception.jsonl", "harmfulness.jsonl"):
        assert (tmp_path / "data" / name).read_bytes() == (DATA / name).read_bytes(), name
    # The builders the scripts call, on data/detectors itself.
    assert jsonl_text(refusal_rows(DATA, log=lambda s: None)) == (DATA / "refusal.jsonl").read_text()
    assert jsonl_text(compliance_rows(DATA)) == (DATA / "harmful_compliance.jsonl").read_text()


def test_the_default_recipe_asks_for_the_lengths_the_shipped_answers_were_made_with(tmp_path: Path) -> None:
    """data/detectors/SOURCE.md: refusal answers <= 48 tokens, confusable <= 40; data/ordinary: 32."""
    prompts = prepare(tmp_path, 12, log=lambda s: None)
    lengths = {(p["id"].partition("/")[0], p["max_new_tokens"]) for p in prompts}
    assert lengths == {("refusal", 48), ("confusable", 40), ("ordinary", 32)} == set(ANSWER_TOKENS.items())
    assert {p["max_new_tokens"] for p in prepare(tmp_path, 12, log=lambda s: None, max_new_tokens=20)} == {20}


def test_answers_of_another_length_are_generated_again_never_reused(tmp_path: Path) -> None:
    """A cache from a run with other lengths (or from before lengths were recorded) is not silently
    reused: those prompts are pending again, and rebuild reads only the newest answer of the asked length."""
    prompts = prepare(tmp_path, 12, log=lambda s: None)
    out = tmp_path / "answers.jsonl"
    old = [{**p, "response": "An old, short answer.", "max_new_tokens": 32} for p in prompts]
    old[0].pop("max_new_tokens")  # written before the length was recorded
    out.write_text(jsonl_text(old))
    stale = {p["id"] for p in prompts if p["max_new_tokens"] != 32}
    assert {p["id"] for p in pending(prompts, out)} == stale | {prompts[0]["id"]}
    assert stale and all(not answers_prompt(a, p) for a, p in zip(old, prompts, strict=True) if p["id"] in stale)
    new = [{**p, "response": "A new answer of the asked length."} for p in pending(prompts, out)]
    append_answers(out, new)
    assert pending(prompts, out) == []
    rebuild(tmp_path, out, prompts, log=lambda s: None)
    mine = [json.loads(x) for x in (tmp_path / "data" / "model_responses.jsonl").read_text().splitlines()]
    assert len(mine) == sum(p["id"].startswith("refusal/") for p in prompts)  # one row per prompt, no duplicate
    assert {r["response"] for r in mine} == {"A new answer of the asked length."}


def test_a_prompt_with_a_bad_length_is_refused_naming_the_line(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "hi", "max_new_tokens": 0}\n')
    expected = r"prompts.jsonl:2: prompt 'b': max_new_tokens: expected an integer >= 1, got 0"
    with pytest.raises(ValueError, match=expected):
        read_prompts(path)


def test_a_limited_slice_keeps_every_source_fittable(tmp_path: Path) -> None:
    prompts = prepare(tmp_path, 12, log=lambda s: None)
    ans = [{**p, "response": "Sure. Here is a plain answer."} for p in prompts]
    (tmp_path / "answers.jsonl").write_text(jsonl_text(ans) + '{"id": "refusal/torn')  # an interrupted run's last line
    sizes = rebuild(tmp_path, tmp_path / "answers.jsonl", prompts, log=lambda s: None)
    assert all(n > 0 for n in sizes.values()), sizes
    for name in ("deception", "deceptive_answer", "sycophancy", "harmfulness", "refusal", "harmful_compliance"):
        rows = [json.loads(x) for x in (tmp_path / "data" / f"{name}.jsonl").read_text().splitlines()]
        for source in {r["source"] for r in rows}:
            labels = {r["label"] for r in rows if r["source"] == source}
            if name != "harmful_compliance" or source == "hh_rlhf_tqa":
                assert labels == {0, 1}, (name, source, labels)
    ordinary = [json.loads(x) for x in (tmp_path / "data" / "ordinary.jsonl").read_text().splitlines()]
    assert {r["source"] for r in ordinary} == {"ordinary_calibration", "ordinary_held_out"}
    assert {r["kind"] for r in ordinary} == {"everyday", "borderline", "harmful"}
    # The ordinary prompt ids are those of the full files (the workload is read through symlinks).
    assert (tmp_path / "ordinary" / "A1_alpaca_eval").resolve() == (ORDINARY / "A1_alpaca_eval").resolve()
    shutil.rmtree(tmp_path / "ordinary")
