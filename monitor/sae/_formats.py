"""SAE files on disk: the native format plus named converters for community formats.

- native: ``sae.json`` (``{"format": "safety-monitor-sae", "version": 1, "config": {...}}``) and
  ``sae.safetensors`` (weights in ``config.dtype``).
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``from_saelens`` / ``save_saelens``).
- sparsify (EleutherAI): ``cfg.json`` + ``sae.safetensors`` as ``Sae.save_to_disk`` writes them,
  read as TopK (``from_sparsify``).
- Gemma Scope: ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold`` (``from_gemma_scope``).

``load(path)`` detects which one a path holds. Parsing is ``_files`` (numpy, no torch); this
module builds the torch ``SAE`` from it and writes files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from monitor.sae._base import SAE
from monitor.sae._config import SAEConfig
from monitor.sae._files import (
    FORMAT_NAME,
    NATIVE_CFG,
    NATIVE_WEIGHTS,
    SAELENS_CFG,
    SAELENS_WEIGHTS,
    State,
    read,
    read_gemma_scope,
    read_native,
    read_saelens,
    read_sparsify,
)

_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def save(sae: SAE, folder: str | Path, *, extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` in the native format (weights stored in ``sae.cfg.dtype``)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    dtype = _TORCH_DTYPES[sae.cfg.dtype]
    save_file({k: v.to(dtype).contiguous() for k, v in sae.state().items()}, str(out / NATIVE_WEIGHTS))
    meta = {"format": FORMAT_NAME, "version": 1, "config": sae.cfg.to_dict(), **(extra or {})}
    (out / NATIVE_CFG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load(path: str | Path) -> SAE:
    """Load an SAE from a native, SAELens or sparsify folder, or a Gemma Scope ``params.npz``."""
    return SAE.from_state(*_torch(read(path)))


def _load_native(folder: Path) -> SAE:
    return SAE.from_state(*_torch(read_native(folder)))


# -- SAELens --------------------------------------------------------------------------------------
def from_saelens(folder: str | Path, *, norm_scaling_factor: float | None = None) -> SAE:
    """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``); see ``_files.read_saelens``."""
    return SAE.from_state(*_torch(read_saelens(Path(folder), norm_scaling_factor)))


def save_saelens(sae: SAE, folder: str | Path) -> Path:
    """Write ``sae`` as a SAELens folder (architecture names as SAELens spells them)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    c = sae.cfg
    arch = {"relu": "standard", "jumprelu": "jumprelu", "topk": "topk"}[c.architecture]
    raw: dict[str, Any] = {
        "architecture": arch,
        "d_in": c.d_in,
        "d_sae": c.d_sae,
        "dtype": c.dtype,
        "hook_name": c.hook_point,
        "model_name": c.model_id,
        "apply_b_dec_to_input": c.apply_b_dec_to_input,
        "normalize_activations": c.normalize_activations,
    }
    if c.norm_scaling_factor is not None:
        raw["norm_scaling_factor"] = c.norm_scaling_factor
    if c.architecture == "topk":
        raw["k"] = c.k
    (out / SAELENS_CFG).write_text(json.dumps(raw, indent=2))
    save_file({k: v.float().contiguous() for k, v in sae.state().items()}, str(out / SAELENS_WEIGHTS))
    return out


# -- sparsify -------------------------------------------------------------------------------------
def from_sparsify(folder: str | Path, *, hook_point: str | None = None, model_id: str = "") -> SAE:
    """Load an EleutherAI sparsify folder (``cfg.json`` + ``sae.safetensors``) as a TopK SAE.

    ``hook_point`` defaults from the folder name (``layers.N`` -> ``blocks.N.hook_resid_post``);
    transcoders, skip connections and groupmax are refused (see ``_files.read_sparsify``).
    """
    return SAE.from_state(*_torch(read_sparsify(Path(folder), hook_point, model_id)))


# -- Gemma Scope ----------------------------------------------------------------------------------
def from_gemma_scope(npz: str | Path, *, hook_point: str = "", model_id: str = "") -> SAE:
    """Load a Gemma Scope ``params.npz`` (JumpReLU, ``apply_b_dec_to_input=False``)."""
    return SAE.from_state(*_torch(read_gemma_scope(Path(npz), hook_point, model_id)))


def _torch(read: tuple[SAEConfig, State]) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    cfg, state = read
    return cfg, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()}
