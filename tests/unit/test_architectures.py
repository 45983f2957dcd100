"""monitor.architectures on real (tiny, random-weight) transformers models of each family.

The hooks on ``decoder_layers(model)`` must capture exactly what ``output_hidden_states=True``
returns as ``hidden_states[L + 1]``; every unsupported case is refused with a one-line message
naming the problem, before any long job.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    Gemma2Config,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from monitor.architectures import (
    FAMILIES,
    ArchitectureError,
    architecture_of,
    check_chat_template,
    check_hook_points,
    check_vllm_capture,
    decoder_layer,
    decoder_layers,
    family,
    vllm_layer_ids,
)
from monitor.errors import MonitorError
from monitor.models import ModelNotAvailable, default_model_cache, is_converted, load_default_model, load_model
from monitor.sae import SAE, SAEConfig

VOCAB = 512
LAYERS = 4


def _tiny(cls: Any, hidden: int, **extra: Any) -> Any:
    return cls(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=LAYERS,
        num_attention_heads=hidden // 64,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=256,
        **extra,
    )


CONFIGS = {
    "LlamaForCausalLM": lambda: _tiny(LlamaConfig, 256),
    "Qwen2ForCausalLM": lambda: _tiny(Qwen2Config, 192),
    "Gemma2ForCausalLM": lambda: _tiny(Gemma2Config, 128),
    "MistralForCausalLM": lambda: _tiny(MistralConfig, 128),
    "Qwen3ForCausalLM": lambda: _tiny(Qwen3Config, 128),
    "Gemma3ForCausalLM": lambda: _tiny(Gemma3TextConfig, 128),
}


def tiny_model(architecture: str) -> Any:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(CONFIGS[architecture](), attn_implementation="eager")
    return model.eval()


def one_line(exc: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(exc.value)
    assert "\n" not in text and isinstance(exc.value, MonitorError), text
    return text


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """The default model's tokenizer (with its chat template)."""
    folder = default_model_cache()
    if not is_converted(folder):
        return load_default_model()[1]
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("architecture", sorted(CONFIGS))
def test_decoder_layer_hooks_capture_hidden_states_l_plus_1(architecture: str) -> None:
    """Exactly, for every layer but the last (HF returns that one after the final norm), with the
    family found from ``model_type`` alone (a config built in memory names no architecture)."""
    model = tiny_model(architecture)
    assert model.config.architectures is None and architecture_of(model.config) == architecture
    assert type(model).__name__ == architecture and family(model.config).hf_tested
    layers = decoder_layers(model)
    assert len(layers) == LAYERS
    captured: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):

        def hook(module: Any, inputs: Any, output: Any, i: int = i) -> None:
            captured[i] = (output[0] if isinstance(output, tuple) else output).detach().clone()

        handles.append(layer.register_forward_hook(hook))
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    assert len(hs) == LAYERS + 1
    for layer in range(LAYERS - 1):
        assert torch.equal(captured[layer], hs[layer + 1]), (architecture, layer)
        assert not torch.equal(captured[layer], hs[layer])  # a shift by one would be caught
    with torch.no_grad():  # the last one: HF returns it after the final norm, the hook before
        assert torch.allclose(model.model.norm(captured[LAYERS - 1]), hs[LAYERS], atol=1e-6)
    assert decoder_layer(model, f"blocks.{LAYERS - 2}.hook_resid_post") is layers[LAYERS - 2]


def test_every_family_is_registered_with_its_vllm_status() -> None:
    assert set(CONFIGS) == set(FAMILIES)
    vllm = {a: f.vllm for a, f in FAMILIES.items()}
    assert vllm == {
        "LlamaForCausalLM": "tested",  # tests/integration/test_vllm_architectures.py
        "Qwen2ForCausalLM": "tested",
        "MistralForCausalLM": "tested",  # tests/integration/test_bundle_build.py (two hook points)
        "Qwen3ForCausalLM": "read from source",
        "Gemma2ForCausalLM": "unsupported",
        "Gemma3ForCausalLM": "unsupported",
    }


def test_vllm_layer_ids_count_from_the_embeddings() -> None:
    hps = ["blocks.0.hook_resid_post", "blocks.16.hook_resid_post"]
    for arch in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert vllm_layer_ids(arch, hps) == [1, 17]
    with pytest.raises(ArchitectureError) as exc:
        vllm_layer_ids("Gemma2ForCausalLM", hps)
    assert one_line(exc).startswith("architecture 'Gemma2ForCausalLM': vLLM 0.32's native Gemma2ForCausalLM")
    assert "SupportsEagle3" in str(exc.value)
    with pytest.raises(ArchitectureError, match="Gemma3ForCausalLM implements no SupportsEagle3"):
        vllm_layer_ids("Gemma3ForCausalLM", hps)


def test_vllm_capture_check_names_the_mismatch() -> None:
    cfg = CONFIGS["LlamaForCausalLM"]()
    hps = ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    check_vllm_capture("LlamaForCausalLM", cfg, hps, [2, 4])
    with pytest.raises(ArchitectureError) as exc:
        check_vllm_capture("LlamaForCausalLM", cfg, hps, [1, 3])  # ids counted from layer 0: off by one
    assert one_line(exc) == (
        "eagle_aux_hidden_state_layer_ids: expected [2, 4] for "
        "['blocks.1.hook_resid_post', 'blocks.3.hook_resid_post'] on LlamaForCausalLM, got [1, 3]"
    )
    with pytest.raises(ArchitectureError, match="ascending layers"):
        check_vllm_capture("LlamaForCausalLM", cfg, hps[::-1], [4, 2])


def test_unknown_architecture_is_one_line() -> None:
    with pytest.raises(ArchitectureError) as exc:
        family("FooForCausalLM")
    assert one_line(exc) == f"architecture 'FooForCausalLM': expected one of {', '.join(FAMILIES)}"
    with pytest.raises(ArchitectureError) as exc:
        check_hook_points(GPT2Config(n_layer=2), ["blocks.0.hook_resid_post"])
    assert one_line(exc).startswith("architecture \"<no architectures, model_type 'gpt2'>\": expected one of")
    with pytest.raises(ArchitectureError) as exc:
        family({"architectures": ["Gemma3ForConditionalGeneration"]})
    assert "text-only Gemma3ForCausalLM" in one_line(exc)


def test_hook_point_past_the_last_layer() -> None:
    cfg = LlamaConfig(num_hidden_layers=32)
    assert check_hook_points(cfg, ["blocks.0.hook_resid_post", "blocks.31.hook_resid_post"]) == [0, 31]
    with pytest.raises(ArchitectureError) as exc:
        check_hook_points(cfg, ["blocks.40.hook_resid_post"])
    assert one_line(exc) == "hook_point 'blocks.40.hook_resid_post': the model has layers 0..31"
    with pytest.raises(ArchitectureError, match=r"expected 'blocks\.<layer>\.hook_resid_post'"):
        check_hook_points(cfg, ["layer16"])


def test_tokenizer_without_chat_template(tokenizer: Any, tmp_path: Path) -> None:
    check_chat_template(tokenizer)
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    with pytest.raises(ArchitectureError) as exc:
        check_chat_template(bare)
    msg = one_line(exc)
    assert msg.startswith("tokenizer: ") and msg.endswith(
        "has no chat template; the decision row is the last prompt-template token of the model's own chat template"
    )
    # load_model refuses such a folder before loading any weights (there are none here).
    tiny_model("Qwen2ForCausalLM").config.save_pretrained(tmp_path)
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ArchitectureError, match="has no chat template"):
        load_model(str(tmp_path))


def test_sae_of_another_width_is_refused_before_the_evaluation(tokenizer: Any) -> None:
    from monitor.sae._evaluate import spliced_lm_loss

    model = tiny_model("LlamaForCausalLM")
    state = {
        "W_enc": torch.zeros(576, 8),
        "b_enc": torch.zeros(8),
        "W_dec": torch.zeros(8, 576),
        "b_dec": torch.zeros(576),
    }
    sae = SAE.from_state(SAEConfig(576, 8, hook_point="blocks.1.hook_resid_post"), state)
    convs = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    with pytest.raises(ArchitectureError) as exc:
        spliced_lm_loss(model, tokenizer, sae, convs, progress=False)
    assert one_line(exc) == "sae d_in: 576 differs from the model's hidden size 256 (made for another model?)"


def test_load_model_from_a_folder_and_its_errors(tokenizer: Any, tmp_path: Path) -> None:
    model = tiny_model("Qwen2ForCausalLM")
    model.save_pretrained(tmp_path / "qwen2")
    tokenizer.save_pretrained(tmp_path / "qwen2")
    lm, tok = load_model(str(tmp_path / "qwen2"))
    assert type(lm).__name__ == "Qwen2ForCausalLM" and not lm.training and tok.chat_template
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():  # the same weights (the attention kernel may differ: eager here, sdpa there)
        np.testing.assert_allclose(lm(ids).logits.numpy(), model(ids).logits.numpy(), atol=1e-5)

    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=2, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    with pytest.raises(ArchitectureError) as exc:
        load_model(str(gpt2))
    assert one_line(exc) == f"architecture 'GPT2LMHeadModel': expected one of {', '.join(FAMILIES)}"

    with pytest.raises(ModelNotAvailable) as exc:
        load_model("nobody-here/no-such-model")
    assert "not in the local Hugging Face cache" in one_line(exc)
    with pytest.raises(ModelNotAvailable) as exc:
        load_model(str(tmp_path / "missing.gguf"))
    assert one_line(exc) == f"model: expected a GGUF file at {tmp_path / 'missing.gguf'}, file missing"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotAvailable, match=r"config\.json"):
        load_model(str(tmp_path / "empty"))
    assert json.loads((tmp_path / "qwen2" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]


def test_cli_collect_refuses_a_hook_point_past_the_last_layer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end: `monitor collect` exits 2 with one line, before collecting anything."""
    from monitor.cli import main

    rc = main(["collect", "--out", str(tmp_path / "acts"), "--hook-point", "blocks.40.hook_resid_post"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1] == "monitor collect: hook_point 'blocks.40.hook_resid_post': the model has layers 0..29"
    assert not (tmp_path / "acts").exists()
