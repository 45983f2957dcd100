"""SAE files on disk: the native format plus named converters for community formats.

- native: ``sae.json`` (``{"format": "safety-monitor-sae", "version": 1, "config": {...}}``) and
  ``sae.safetensors`` (weights in ``config.dtype``).
- SAELens: ``cfg.json`` + ``sae_weights.safetensors`` (``from_saelens`` / ``save_saelens``).
- Gemma Scope: ``params.npz`` with ``W_enc, W_dec, b_enc, b_dec, threshold`` (``from_gemma_scope``).

``load(path)`` detects which one a path holds.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from monitor.sae._base import SAE
from monitor.sae._config import SAEConfig, SAEError

log = logging.getLogger("monitor.sae")

NATIVE_CFG = "sae.json"
NATIVE_WEIGHTS = "sae.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE = "params.npz"
FORMAT_NAME = "safety-monitor-sae"
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
    """Load an SAE from a native folder, a SAELens folder or a Gemma Scope ``params.npz``."""
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return from_gemma_scope(p)
    if (p / NATIVE_CFG).is_file():
        return _load_native(p)
    if (p / SAELENS_CFG).is_file():
        return from_saelens(p)
    if (p / GEMMA_SCOPE).is_file():
        return from_gemma_scope(p / GEMMA_SCOPE)
    raise SAEError(
        f"SAE path {p}: expected a folder with {NATIVE_CFG} (native), {SAELENS_CFG} (SAELens) "
        f"or {GEMMA_SCOPE} (Gemma Scope), or a .npz file; found none"
    )


def _load_native(folder: Path) -> SAE:
    meta = json.loads((folder / NATIVE_CFG).read_text())
    if meta.get("format") != FORMAT_NAME or meta.get("version") != 1:
        raise SAEError(
            f"{folder / NATIVE_CFG}: expected format {FORMAT_NAME!r} version 1, "
            f"got {meta.get('format')!r} version {meta.get('version')!r}"
        )
    cfg = SAEConfig.from_dict(meta["config"])
    return SAE.from_state(cfg, load_file(str(folder / NATIVE_WEIGHTS)))


# -- SAELens --------------------------------------------------------------------------------------
_SAELENS_ARCH = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}


def from_saelens(folder: str | Path, *, norm_scaling_factor: float | None = None) -> SAE:
    """Load a SAELens folder (``cfg.json`` + ``sae_weights.safetensors``).

    Honours ``apply_b_dec_to_input``; JumpReLU ``threshold`` or ``log_threshold``; TopK ``k``
    (in ``cfg`` or ``activation_fn_kwargs``). ``normalize_activations`` "none" reads raw
    activations; "expected_average_only_in" scales inputs by the factor from the config's
    ``norm_scaling_factor`` (or the argument) and is folded into the weights. Without a factor
    the weights are taken as already folded, as SAELens does at inference.
    """
    folder = Path(folder)
    raw = json.loads((folder / SAELENS_CFG).read_text())
    arch_key = raw.get("architecture") or raw.get("activation_fn_str") or "standard"
    if raw.get("activation_fn_str") == "topk" or raw.get("activation_fn") == "topk":
        arch_key = "topk"
    if arch_key not in _SAELENS_ARCH:
        raise SAEError(
            f"{folder / SAELENS_CFG}: architecture: expected one of {sorted(_SAELENS_ARCH)}, got {arch_key!r}"
        )
    arch = _SAELENS_ARCH[arch_key]
    k = raw.get("k") or (raw.get("activation_fn_kwargs") or {}).get("k")
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "expected_average_only_in"):
        raise SAEError(
            f"{folder / SAELENS_CFG}: normalize_activations: expected 'none' or "
            f"'expected_average_only_in', got {norm!r}"
        )
    factor = norm_scaling_factor if norm_scaling_factor is not None else raw.get("norm_scaling_factor")
    if norm == "expected_average_only_in" and factor is None:
        log.info("%s: expected_average_only_in without a scaling factor: weights taken as folded", folder)
        norm = "none"
    cfg = SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch,
        k=int(k) if arch == "topk" and k is not None else None,
        dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
        hook_point=str(raw.get("hook_name") or raw.get("hook_point") or ""),
        model_id=str(raw.get("model_name") or ""),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        norm_scaling_factor=float(factor) if norm != "none" and factor is not None else None,
    )
    state = dict(load_file(str(folder / SAELENS_WEIGHTS)))
    if arch == "jumprelu" and "threshold" not in state:
        if "log_threshold" not in state:
            raise SAEError(f"{folder / SAELENS_WEIGHTS}: expected 'threshold' or 'log_threshold' for jumprelu")
        state["threshold"] = state.pop("log_threshold").exp()
    return SAE.from_state(cfg, state).fold_input_scale()


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


# -- Gemma Scope ----------------------------------------------------------------------------------
def from_gemma_scope(npz: str | Path, *, hook_point: str = "", model_id: str = "") -> SAE:
    """Load a Gemma Scope ``params.npz`` (JumpReLU, ``apply_b_dec_to_input=False``)."""
    npz = Path(npz)
    with np.load(npz) as f:
        missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(f.files)
        if missing:
            raise SAEError(f"{npz}: expected arrays W_enc, W_dec, b_enc, b_dec, threshold; missing {sorted(missing)}")
        state = {k: torch.from_numpy(np.asarray(f[k], dtype=np.float32)) for k in f.files}
    d_in, d_sae = state["W_enc"].shape
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture="jumprelu",
        hook_point=hook_point,
        model_id=model_id,
        apply_b_dec_to_input=False,
    )
    return SAE.from_state(cfg, state)
