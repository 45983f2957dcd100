"""SAE files read into numpy, and the encoder slice the detectors serve with: no torch here.

``read(path)`` returns the config and float32 weights (SAELens names) of a native folder, a
SAELens folder, a sparsify folder or a Gemma Scope ``params.npz``; the torch ``SAE`` is built from
the same arrays (``_formats``). ``EncoderSlice`` is columns ``latent_ids`` of the encoder with the
input scale and ``b_dec`` folded in, so serving a bundle (``monitor serve``) never imports torch.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitor.errors import echo, read_json_object
from monitor.sae._config import SAEConfig, SAEError

log = logging.getLogger("monitor.sae")

NATIVE_CFG = "sae.json"
NATIVE_WEIGHTS = "sae.safetensors"
SAELENS_CFG = "cfg.json"
SAELENS_WEIGHTS = "sae_weights.safetensors"
GEMMA_SCOPE = "params.npz"
SPARSIFY_CFG = "cfg.json"
SPARSIFY_WEIGHTS = "sae.safetensors"
FORMAT_NAME = "safety-monitor-sae"
SAELENS_ARCHITECTURES = {"standard": "relu", "relu": "relu", "jumprelu": "jumprelu", "topk": "topk"}

State = dict[str, np.ndarray]


def read(path: str | Path) -> tuple[SAEConfig, State]:
    """Config and float32 weights of the SAE at ``path`` (native, SAELens, sparsify or Gemma Scope).

    A ``cfg.json`` folder is SAELens's when it holds ``sae_weights.safetensors`` and sparsify's
    when it holds ``sae.safetensors`` instead.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".npz":
        return _checked(p, *read_gemma_scope(p))
    if (p / NATIVE_CFG).is_file():
        return _checked(p, *read_native(p))
    if (p / SPARSIFY_CFG).is_file() and (p / SPARSIFY_WEIGHTS).is_file() and not (p / SAELENS_WEIGHTS).is_file():
        return _checked(p, *read_sparsify(p))
    if (p / SAELENS_CFG).is_file():
        return _checked(p, *read_saelens(p))
    if (p / GEMMA_SCOPE).is_file():
        return _checked(p, *read_gemma_scope(p / GEMMA_SCOPE))
    raise SAEError(
        f"SAE path {p}: expected a folder with {NATIVE_CFG} (native), {SAELENS_CFG} + {SAELENS_WEIGHTS} "
        f"(SAELens), {SPARSIFY_CFG} + {SPARSIFY_WEIGHTS} (sparsify) or {GEMMA_SCOPE} (Gemma Scope), "
        "or a .npz file; found none"
    )


def _checked(path: Path, cfg: SAEConfig, state: State) -> tuple[SAEConfig, State]:
    """The encoder a bundle serves with has the config's shapes and finite values: a bad file
    fails here, at start-up, naming the tensor, not on every scored request."""
    expected = {"W_enc": (cfg.d_in, cfg.d_sae), "b_enc": (cfg.d_sae,), "b_dec": (cfg.d_in,)}
    if "W_dec" in state:
        expected["W_dec"] = (cfg.d_sae, cfg.d_in)
    if cfg.architecture == "jumprelu":
        expected["threshold"] = (cfg.d_sae,)
    for name, shape in expected.items():
        got = state.get(name)
        if got is None:
            raise SAEError(f"{path}: {name}: expected a tensor of shape {list(shape)}, missing")
        if tuple(got.shape) != shape:
            raise SAEError(f"{path}: {name}: expected shape {list(shape)} (d_in, d_sae), got {list(got.shape)}")
        if not np.isfinite(got).all():
            raise SAEError(f"{path}: {name}: expected finite values, got NaN or infinity")
    return cfg, state


def _read_json_object(path: Path) -> dict[str, Any]:
    """A JSON config file as a dict, or ``SAEError`` naming the file (never a decoder traceback)."""
    return read_json_object(path, SAEError)


def read_native(folder: Path) -> tuple[SAEConfig, State]:
    meta = _read_json_object(folder / NATIVE_CFG)
    if meta.get("format") != FORMAT_NAME or meta.get("version") != 1:
        raise SAEError(
            f"{folder / NATIVE_CFG}: expected format {FORMAT_NAME!r} version 1, "
            f"got {echo(meta.get('format'))} version {echo(meta.get('version'))}"
        )
    config = meta.get("config")
    if not isinstance(config, dict):
        raise SAEError(f"{folder / NATIVE_CFG}: config: expected an object, got {echo(config)}")
    try:
        cfg = SAEConfig.from_dict(config)
    except TypeError as exc:  # a missing size or a value of the wrong type
        raise SAEError(f"{folder / NATIVE_CFG}: config: {exc}") from None
    except SAEError as exc:
        raise SAEError(f"{folder / NATIVE_CFG}: config: {exc}") from None
    return cfg, load_safetensors(folder / NATIVE_WEIGHTS)


def read_saelens(folder: Path, norm_scaling_factor: float | None = None) -> tuple[SAEConfig, State]:
    """A SAELens folder; SAELens 6 nests ``hook_name`` / ``model_name`` under ``metadata``.

    Honours ``apply_b_dec_to_input``; JumpReLU ``threshold`` or ``log_threshold``; TopK ``k``
    (in ``cfg`` or ``activation_fn_kwargs``). ``normalize_activations`` "none" reads raw
    activations; "expected_average_only_in" scales inputs by the factor from the config's
    ``norm_scaling_factor`` (or the argument), folded into the weights here. Without a factor
    the weights are taken as already folded, as SAELens does at inference.
    """
    raw = _read_json_object(folder / SAELENS_CFG)
    meta: Mapping[str, Any] = raw.get("metadata") or {}
    arch_key = raw.get("architecture") or raw.get("activation_fn_str") or "standard"
    if raw.get("activation_fn_str") == "topk" or raw.get("activation_fn") == "topk":
        arch_key = "topk"
    if arch_key not in SAELENS_ARCHITECTURES:
        raise SAEError(
            f"{folder / SAELENS_CFG}: architecture: expected one of {sorted(SAELENS_ARCHITECTURES)}, got {arch_key!r}"
        )
    arch = SAELENS_ARCHITECTURES[arch_key]
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
    hook = raw.get("hook_name") or raw.get("hook_point") or meta.get("hook_name") or ""
    cfg = SAEConfig(
        d_in=int(raw["d_in"]),
        d_sae=int(raw["d_sae"]),
        architecture=arch,
        k=int(k) if arch == "topk" and k is not None else None,
        dtype=str(raw.get("dtype", "float32")).replace("torch.", ""),
        hook_point=str(hook),
        model_id=str(raw.get("model_name") or meta.get("model_name") or ""),
        apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)),
        normalize_activations=norm,
        norm_scaling_factor=float(factor) if norm != "none" and factor is not None else None,
    )
    state = load_safetensors(folder / SAELENS_WEIGHTS)
    if arch == "jumprelu" and "threshold" not in state:
        if "log_threshold" not in state:
            raise SAEError(f"{folder / SAELENS_WEIGHTS}: expected 'threshold' or 'log_threshold' for jumprelu")
        state["threshold"] = np.exp(state.pop("log_threshold"))
    return fold_input_scale(cfg, state)


def read_gemma_scope(npz: Path, hook_point: str = "", model_id: str = "") -> tuple[SAEConfig, State]:
    """A Gemma Scope ``params.npz`` (JumpReLU, ``apply_b_dec_to_input=False``)."""
    with np.load(npz) as f:
        missing = {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"} - set(f.files)
        if missing:
            raise SAEError(f"{npz}: expected arrays W_enc, W_dec, b_enc, b_dec, threshold; missing {sorted(missing)}")
        state = {k: np.asarray(f[k], dtype=np.float32) for k in f.files}
    d_in, d_sae = state["W_enc"].shape
    cfg = SAEConfig(
        d_in=int(d_in),
        d_sae=int(d_sae),
        architecture="jumprelu",
        hook_point=hook_point,
        model_id=model_id,
        apply_b_dec_to_input=False,
    )
    return cfg, state


_SPARSIFY_HOOK = re.compile(r"^layers\.(\d+)$")
_SAFETENSORS_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def read_sparsify(folder: Path, hook_point: str | None = None, model_id: str = "") -> tuple[SAEConfig, State]:
    """An EleutherAI ``sparsify`` folder (``Sae.save_to_disk``: ``cfg.json`` + ``sae.safetensors``).

    Read as a TopK SAE with ``b_dec`` subtracted from the input, which is sparsify's ``encode``:
    ``relu((x - b_dec) @ encoder.weight.T + encoder.bias)``, then the ``k`` largest. This project's
    TopK takes the ``k`` largest pre-activations and then applies ReLU: the dense latents are the
    same (they differ only in which zero entries are "selected" when fewer than ``k`` are positive).
    The width is ``num_latents``, or ``d_in * expansion_factor`` when that is 0. ``multi_topk`` is
    a training loss and ``normalize_decoder`` a training constraint: neither changes the encode.
    Refused, with the field named: ``activation`` other than "topk" (groupmax), ``transcode``
    (a transcoder predicts another module's output) and ``skip_connection`` (``W_skip``).
    ``hook_point`` defaults from the folder's name, which is sparsify's hook point: ``layers.N``
    (the output of decoder layer N) is ``blocks.N.hook_resid_post``; any other name gives "".
    """
    cfg_path, weights_path = folder / SPARSIFY_CFG, folder / SPARSIFY_WEIGHTS
    for f in (cfg_path, weights_path):
        if not f.is_file():
            raise SAEError(f"{folder}: expected sparsify's {SPARSIFY_CFG} and {SPARSIFY_WEIGHTS}; {f.name} is missing")
    raw = _read_json_object(cfg_path)
    if "d_in" not in raw:
        raise SAEError(f"{cfg_path}: d_in: missing (sparsify's save_to_disk writes it)")
    activation = raw.get("activation", "topk")
    if activation != "topk":
        raise SAEError(f"{cfg_path}: activation: only 'topk' is supported, got {activation!r}")
    for key, what in (("transcode", "a transcoder"), ("skip_connection", "a skip connection (W_skip)")):
        if raw.get(key):
            raise SAEError(f"{cfg_path}: {key}: {what} is not supported; only plain sparse autoencoders ({key}: false)")
    d_in = int(raw["d_in"])
    num_latents = int(raw.get("num_latents") or 0) or d_in * int(raw.get("expansion_factor", 32))
    k = int(raw.get("k", 32))
    dtypes = _safetensors_dtypes(weights_path)
    state = load_safetensors(weights_path)
    names = ("encoder.weight", "encoder.bias", "W_dec", "b_dec")
    missing = [n for n in names if n not in state]
    if missing:
        raise SAEError(f"{weights_path}: missing {missing}; expected sparsify's {', '.join(names)}")
    if "W_skip" in state:
        raise SAEError(
            f"{weights_path}: W_skip: a skip connection is not supported (cfg.json says skip_connection false)"
        )
    expected = {
        "encoder.weight": (num_latents, d_in),
        "encoder.bias": (num_latents,),
        "W_dec": (num_latents, d_in),
        "b_dec": (d_in,),
    }
    for name, shape in expected.items():
        got = tuple(state[name].shape)
        if got != shape:
            axes = {"encoder.bias": "num_latents", "b_dec": "d_in"}.get(name, "num_latents, d_in")
            raise SAEError(
                f"{weights_path}: {name} has shape {list(got)}, but {cfg_path.name} gives "
                f"d_in={d_in}, num_latents={num_latents}: expected [{axes}] = {list(shape)}"
            )
    if hook_point is None:
        m = _SPARSIFY_HOOK.match(folder.resolve().name)
        hook_point = f"blocks.{m.group(1)}.hook_resid_post" if m else ""
    cfg = SAEConfig(
        d_in=d_in,
        d_sae=num_latents,
        architecture="topk",
        k=k,
        dtype=_SAFETENSORS_DTYPES.get(dtypes.get("encoder.weight", "F32"), "float32"),
        hook_point=hook_point,
        model_id=model_id,
        apply_b_dec_to_input=True,
    )
    out = {
        "W_enc": np.ascontiguousarray(state["encoder.weight"].T),
        "b_enc": state["encoder.bias"],
        "W_dec": state["W_dec"],
        "b_dec": state["b_dec"],
    }
    return cfg, out


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """Stored dtype of each tensor (``"F32"``, ``"BF16"``...), from the file's JSON header."""
    with path.open("rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def input_scale(cfg: SAEConfig) -> float:
    """Factor applied to inputs before encoding (1.0 unless expected_average_only_in)."""
    if cfg.normalize_activations == "expected_average_only_in" and cfg.norm_scaling_factor:
        return float(cfg.norm_scaling_factor)
    return 1.0


def fold_input_scale(cfg: SAEConfig, state: State) -> tuple[SAEConfig, State]:
    """Fold the input scale into the weights, so the SAE reads raw activations (thresholds keep units)."""
    s = input_scale(cfg)
    if s == 1.0:
        return cfg, state
    state = {**state, "W_enc": state["W_enc"] * s, "W_dec": state["W_dec"] / s, "b_dec": state["b_dec"] / s}
    return SAEConfig.from_dict({**cfg.to_dict(), "normalize_activations": "none"}), state


def load_safetensors(path: Path) -> State:
    """Every tensor of a safetensors file as float32 numpy (bfloat16, which numpy lacks, is widened)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        try:
            raw = load_file(str(path))
        except TypeError:  # a bfloat16 tensor: numpy has no such dtype
            raw = _load_with_bfloat16(path)
        return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:  # truncated, garbage
        raise SAEError(f"{path}: expected a safetensors file of SAE weights, unreadable: {exc}") from None


def _load_with_bfloat16(path: Path) -> State:
    """safetensors' documented layout: u64 header length, JSON header, then the raw little-endian data."""
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    out: State = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        data = blob[8 + n + start : 8 + n + end]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(data, dtype="<u2").astype(np.uint32) << 16
            arr = bits.view(np.float32)
        else:
            arr = np.frombuffer(data, dtype=np.dtype(_NUMPY_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"])
    return out


_NUMPY_DTYPES = {"F32": "f4", "F16": "f2", "F64": "f8", "I64": "i8", "I32": "i4", "I16": "i2", "I8": "i1", "U8": "u1"}


@dataclass(frozen=True)
class EncoderSlice:
    """Latents ``latent_ids`` of an SAE: ``pre = x @ W + b``, latent = ``pre`` where ``pre > threshold`` and > 0.

    ReLU and JumpReLU latents are independent, so the slice equals the full encode on those ids.
    TopK latents compete: a TopK SAE cannot be sliced (``slice_encoder`` refuses it).
    """

    latent_ids: tuple[int, ...]
    W: np.ndarray  # [d_in, k] float32
    b: np.ndarray  # [k]
    threshold: np.ndarray  # [k]: 0 for ReLU

    def activate(self, pre: np.ndarray) -> np.ndarray:
        out: np.ndarray = np.where(pre > self.threshold, np.maximum(pre, 0.0), 0.0).astype(pre.dtype, copy=False)
        return out

    def encode(self, x: np.ndarray) -> np.ndarray:
        return self.activate(x.astype(np.float32, copy=False) @ self.W + self.b)


def slice_encoder(cfg: SAEConfig, state: Mapping[str, np.ndarray], latent_ids: Sequence[int]) -> EncoderSlice:
    """Columns ``latent_ids`` of the encoder, with the input scale and ``b_dec`` folded into ``W`` and ``b``.

    >>> rng = np.random.default_rng(0)
    >>> cfg = SAEConfig(8, 32)
    >>> st = {"W_enc": rng.normal(size=(8, 32)), "b_enc": rng.normal(size=32), "b_dec": rng.normal(size=8)}
    >>> x = rng.normal(size=(5, 8))
    >>> full = np.maximum((x - st["b_dec"]) @ st["W_enc"] + st["b_enc"], 0)[:, [3, 7, 30]]
    >>> bool(np.allclose(slice_encoder(cfg, st, [3, 7, 30]).encode(x), full, atol=1e-5))
    True
    """
    ids = [int(i) for i in latent_ids]
    if not ids:
        raise SAEError("latent_ids: expected at least one latent id, got none")
    bad = [i for i in ids if not 0 <= i < cfg.d_sae]
    if bad:
        raise SAEError(f"latent_ids: expected ids in 0..{cfg.d_sae - 1}, got {bad[:5]}")
    if cfg.architecture == "topk":
        raise SAEError("a topk SAE cannot be sliced: whether a latent survives depends on every other latent")
    w_enc = np.asarray(state["W_enc"], dtype=np.float32)[:, ids]
    b_dec = np.asarray(state["b_dec"], dtype=np.float32) if cfg.apply_b_dec_to_input else None
    b = np.asarray(state["b_enc"], dtype=np.float32)[ids]
    if b_dec is not None:
        b = b - b_dec @ w_enc
    jump = cfg.architecture == "jumprelu"
    thr = np.asarray(state["threshold"], dtype=np.float32)[ids] if jump else np.zeros(len(ids), dtype=np.float32)
    return EncoderSlice(
        tuple(ids),
        np.ascontiguousarray(w_enc * input_scale(cfg), dtype=np.float32),
        np.ascontiguousarray(b, dtype=np.float32),
        np.ascontiguousarray(thr, dtype=np.float32),
    )
