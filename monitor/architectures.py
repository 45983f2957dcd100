"""What each supported model family looks like, to the HF paths and to vLLM.

Every path that reads a model's residual stream needs two facts about its architecture: where
the decoder layers are on the transformers model (the HF paths hook their outputs), and which
aux-hidden-state id vLLM's ``extract_hidden_states`` uses for ``blocks.L.hook_resid_post`` (the
adapter asks the engine for those ids). Both are recorded here, per family, with what was tested
on this machine and what was read from vLLM 0.32's source (docs/architectures.md).

The checks raise ``ArchitectureError`` (a ``MonitorError``: the CLI prints one line and exits 2)
before any long job: an unknown architecture, a hook point past the last layer, a tokenizer
without a chat template, an SAE or bundle of another width.

No torch or transformers at module level: the thin client and vLLM's environment import this.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from monitor.errors import MonitorError
from monitor.hook_points import layer_of

if TYPE_CHECKING:
    import torch

__all__ = [
    "FAMILIES",
    "ArchitectureError",
    "Family",
    "architecture_of",
    "check_chat_template",
    "check_hidden_size",
    "check_hook_points",
    "check_vllm_capture",
    "decoder_layer",
    "decoder_layers",
    "family",
    "hidden_size",
    "num_layers",
    "vllm_layer_ids",
]

VllmStatus = Literal["tested", "read from source", "unsupported"]


class ArchitectureError(MonitorError, ValueError):
    """The model (or what is paired with it) does not fit what this project supports; one line."""


@dataclass(frozen=True)
class Family:
    """One architecture family.

    architecture: transformers' ``config.architectures[0]`` (the causal-LM class).
    model_type: ``config.model_type`` (used when a config names no architecture, e.g. from a GGUF).
    hf_layers: attribute path from the causal LM to its decoder ``ModuleList``; each layer's
        output is the residual stream ``hidden_states[L + 1]`` of ``output_hidden_states=True``.
    vllm: whether vLLM 0.32 returns aux hidden states for this class (``unsupported`` when not),
        and whether that was run here (``tested``) or only read in its source.
    vllm_id_offset: vLLM's aux-hidden-state id of ``blocks.L.hook_resid_post`` is ``L + offset``.
    vllm_source: where in vLLM 0.32 that was read, or why it cannot work (the error's text).
    hf_tested: ``decoder_layers`` was checked against ``output_hidden_states`` here.
    """

    architecture: str
    model_type: str
    vllm: VllmStatus
    vllm_source: str
    hf_layers: str = "model.layers"
    vllm_id_offset: int = 1
    hf_tested: bool = True

    def vllm_layer_id(self, layer: int) -> int:
        """vLLM's aux-hidden-state id for decoder layer ``layer``'s output."""
        return layer + self.vllm_id_offset


# vLLM 0.32 (vllm/model_executor/models/*.py): LlamaModel.forward and Qwen2Model.forward call
# EagleModelMixin._maybe_add_hidden_state(aux, idx + 1, hidden_states, residual) after layer idx
# (id 0, start_layer, is the embeddings), with value hidden_states + residual: the residual
# stream after layer idx, which is HF's layer output. MistralModel.forward and Qwen3Model inherit
# that forward. Gemma2Model/Gemma3Model.forward collect nothing and their *ForCausalLM classes do
# not implement SupportsEagle3, so GPUModelRunner._setup_eagle3_aux_hidden_state_outputs raises.
# vLLM's Transformers backend (model_impl="transformers") implements SupportsEagle3, but in 0.32
# extract_hidden_states cannot start with it: SpeculativeConfig copies the target's model_impl into
# the draft config, and update_arch_() then fails to resolve ExtractHiddenStatesModel through the
# Transformers backend ("Cannot find model module"; tried here with a random Gemma2).
_AUX = "{file} {cls}.forward adds layer L's hidden_states + residual as aux id L + 1 (EagleModelMixin)"
_NO_AUX = (
    "vLLM 0.32's native {cls} implements no SupportsEagle3 and its forward collects no aux hidden "
    "states, so extract_hidden_states cannot capture it (and model_impl='transformers' cannot run "
    "extract_hidden_states in 0.32)"
)

FAMILIES: Mapping[str, Family] = {
    f.architecture: f
    for f in (
        Family("LlamaForCausalLM", "llama", "tested", _AUX.format(file="llama.py", cls="LlamaModel")),
        Family("MistralForCausalLM", "mistral", "tested", "mistral.py MistralModel.forward: LlamaModel's"),
        Family("Qwen2ForCausalLM", "qwen2", "tested", _AUX.format(file="qwen2.py", cls="Qwen2Model")),
        Family("Qwen3ForCausalLM", "qwen3", "read from source", "qwen3.py Qwen3Model(Qwen2Model): Qwen2Model's"),
        Family("Gemma2ForCausalLM", "gemma2", "unsupported", _NO_AUX.format(cls="Gemma2ForCausalLM")),
        Family("Gemma3ForCausalLM", "gemma3_text", "unsupported", _NO_AUX.format(cls="Gemma3ForCausalLM")),
    )
}

# Known, and refused with the reason (not the generic "expected one of").
_REFUSED: Mapping[str, str] = {
    "Gemma3ForConditionalGeneration": (
        "the multimodal Gemma 3 (4b and larger) is not supported: its decoder layers are "
        "model.language_model.layers and vLLM 0.32's Gemma3ForConditionalGeneration returns no aux "
        "hidden states; use a text-only Gemma3ForCausalLM checkpoint (gemma-3-270m, gemma-3-1b)"
    ),
}

_BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}


def _get(config: Any, key: str) -> Any:
    if isinstance(config, Mapping):
        return config.get(key)
    return getattr(config, key, None)


def _text_config(config: Any) -> Any:
    """The language model's config (a multimodal config keeps it in ``text_config``)."""
    get = getattr(config, "get_text_config", None)
    if callable(get):
        return get()
    text = _get(config, "text_config")
    return text if text is not None else config


def architecture_of(config: Any) -> str:
    """``config.architectures[0]``, or the family's class for a config that names none (GGUF)."""
    archs = _get(config, "architectures") or []
    if archs:
        return str(archs[0])
    model_type = _get(config, "model_type")
    fam = _BY_MODEL_TYPE.get(str(model_type))
    if fam is not None:
        return fam.architecture
    return f"<no architectures, model_type {model_type!r}>"


def family(config_or_architecture: Any) -> Family:
    """The family of a transformers config (or an architecture name); one-line error when unsupported."""
    given = config_or_architecture
    arch = given if isinstance(given, str) else architecture_of(given)
    fam = FAMILIES.get(arch)
    if fam is not None:
        return fam
    if arch in _REFUSED:
        raise ArchitectureError(f"architecture {arch!r}: {_REFUSED[arch]}")
    raise ArchitectureError(f"architecture {arch!r}: expected one of {', '.join(FAMILIES)}")


def num_layers(config: Any) -> int:
    """Number of decoder layers the config declares."""
    return int(_get(_text_config(config), "num_hidden_layers"))


def hidden_size(config: Any) -> int:
    """Width of the residual stream (``d_model``)."""
    return int(_get(_text_config(config), "hidden_size"))


def check_hook_points(config: Any, hook_points: Iterable[str]) -> list[int]:
    """Decoder-layer index of each hook point, after checking the family and each layer's range."""
    family(config)
    n = num_layers(config)
    layers = []
    for hp in hook_points:
        try:
            layer = layer_of(hp)
        except ValueError as exc:
            raise ArchitectureError(str(exc)) from None
        if not 0 <= layer < n:
            raise ArchitectureError(f"hook_point {hp!r}: the model has layers 0..{n - 1}")
        layers.append(layer)
    return layers


def decoder_layers(model: Any) -> Sequence[torch.nn.Module]:
    """The decoder layers of a transformers causal LM (or of its bare base model), by family."""
    config = getattr(model, "config", None)
    if config is None:
        raise ArchitectureError(f"model: expected a transformers model with a .config, got {type(model).__name__}")
    fam = family(config)
    path = fam.hf_layers.split(".")
    for attempt in (path, path[1:]):  # the causal LM, then a bare base model (AutoModel)
        obj: Any = model
        for part in attempt:
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            if len(obj) != num_layers(config):
                raise ArchitectureError(
                    f"architecture {fam.architecture!r}: {fam.hf_layers} has {len(obj)} layers, "
                    f"the config declares {num_layers(config)}"
                )
            return obj
    raise ArchitectureError(
        f"architecture {fam.architecture!r}: expected the decoder layers at {fam.hf_layers} "
        f"of {type(model).__name__}, found none"
    )


def decoder_layer(model: Any, hook_point: str) -> torch.nn.Module:
    """The decoder layer whose output is ``hook_point``, after checking it exists."""
    (layer,) = check_hook_points(model.config, [hook_point])
    return decoder_layers(model)[layer]


def check_chat_template(tokenizer: Any) -> None:
    """Detectors read the decision row (last prompt-template token): the model needs its own chat template."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ArchitectureError(
            f"tokenizer: {name} has no chat template; the decision row is the last prompt-template "
            "token of the model's own chat template"
        )


def check_hidden_size(config: Any, width: int, what: str) -> None:
    """An SAE's ``d_in`` or a bundle's ``d_model`` must be the model's residual width.

    ``what`` names the value, e.g. ``"sae d_in"``.
    """
    d_model = hidden_size(config)
    if int(width) != d_model:
        raise ArchitectureError(
            f"{what}: {width} differs from the model's hidden size {d_model} (made for another model?)"
        )


def vllm_layer_ids(architecture: str, hook_points: Sequence[str]) -> list[int]:
    """``eagle_aux_hidden_state_layer_ids`` for the hook points, for vLLM 0.32 serving ``architecture``."""
    fam = family(architecture)
    if fam.vllm == "unsupported":
        raise ArchitectureError(f"architecture {architecture!r}: {fam.vllm_source}")
    layers = []
    for hp in hook_points:
        try:
            layers.append(layer_of(hp))
        except ValueError as exc:
            raise ArchitectureError(str(exc)) from None
    return [fam.vllm_layer_id(layer) for layer in layers]


def check_vllm_capture(
    architecture: str,
    config: Any,
    hook_points: Sequence[str],
    layer_ids: Sequence[int] | None,
) -> None:
    """The engine's ``eagle_aux_hidden_state_layer_ids`` capture exactly ``hook_points``, in order.

    vLLM sorts and de-duplicates the ids (``EagleModelMixin._set_aux_hidden_state_layers``) and
    stacks the captured rows in that order, so the hook points must be in ascending layer order.
    """
    check_hook_points(config, hook_points)
    want = vllm_layer_ids(architecture, hook_points)
    if want != sorted(set(want)):
        raise ArchitectureError(
            f"hook_points: expected ascending layers without repeats (vLLM returns aux hidden states "
            f"in layer order), got {list(hook_points)}"
        )
    got = [int(i) for i in layer_ids or ()]
    if got != want:
        raise ArchitectureError(
            f"eagle_aux_hidden_state_layer_ids: expected {want} for {list(hook_points)} on {architecture}, got {got}"
        )
