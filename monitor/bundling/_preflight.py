"""Everything ``monitor bundle build`` can refuse, checked before any long job.

Generating answers, collecting activations and training take minutes to hours, so every problem
that can be seen from the model's config and tokenizer, the SAE's config and the options is
reported first, as one line (``BuildError`` and ``ArchitectureError`` are ``MonitorError``s: the CLI
prints the line and exits 2). The model's weights are never loaded here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitor.architectures import Family, check_hidden_size, check_hook_points, family, hidden_size, num_layers
from monitor.bundling._config import BuildConfig
from monitor.errors import MonitorError
from monitor.sae._config import SAEConfig

__all__ = ["MIN_LATENTS", "BuildError", "Preflight", "preflight"]

# The SAE probes choose among 8, 16 or 32 latents (monitor.detectors._fit.FitConfig.latent_counts).
MIN_LATENTS = 32


class BuildError(MonitorError, ValueError):
    """An option of ``monitor bundle build`` cannot work; the message names it."""


@dataclass(frozen=True)
class Preflight:
    """What the checks learnt about the model (and the SAE), reused by the build.

    layers: decoder-layer index of each hook point, in the order given.
    d_model: the residual stream's width (every hook point's ``d_model``).
    sae: the pretrained SAE's config (None when one is trained).
    engine: ``hf`` or ``vllm``, resolved from ``auto``.
    vllm_python: the interpreter the vLLM engine runs in (when ``engine`` is ``vllm``).
    """

    config: Any
    tokenizer: Any
    family: Family
    layers: tuple[int, ...]
    d_model: int
    n_layers: int
    engine: str
    vllm_python: Path | None = None
    sae: SAEConfig | None = None


def preflight(cfg: BuildConfig) -> Preflight:
    """Check the model, the hook points, the SAE and the options; one-line errors, no weights loaded."""
    from monitor.models import load_config

    if not cfg.hook_points:
        raise BuildError("--hook-point: expected at least one, got none")
    if len(set(cfg.hook_points)) != len(cfg.hook_points):
        raise BuildError(f"--hook-point: expected distinct hook points, got {list(cfg.hook_points)}")
    if (cfg.sae is None) == (cfg.training is None):
        raise BuildError("--sae / --d-sae: expected exactly one (a pretrained SAE, or the width of one to train)")
    if cfg.limit is not None and cfg.limit < 10:
        raise BuildError(f"--limit: expected at least 10 rows per source (5-fold CV needs groups), got {cfg.limit}")
    if cfg.max_new_tokens is not None and cfg.max_new_tokens < 1:
        raise BuildError(f"--max-new-tokens: expected >= 1, got {cfg.max_new_tokens}")
    engine, vllm_python = _engine(cfg)
    config, tokenizer = load_config(cfg.model)  # unknown architecture, no chat template: one line each
    fam = family(config)
    layers = tuple(check_hook_points(config, cfg.hook_points))
    sae = _check_sae(cfg, config) if cfg.sae is not None else None
    if cfg.training is not None:
        _check_training(cfg)
    _check_out(cfg)
    return Preflight(config, tokenizer, fam, layers, hidden_size(config), num_layers(config), engine, vllm_python, sae)


def _engine(cfg: BuildConfig) -> tuple[str, Path | None]:
    """``hf`` or ``vllm`` (``auto``: vLLM when its interpreter exists, else HF in-process)."""
    from monitor.harness.vllm import find_vllm_python

    if cfg.engine not in ("auto", "hf", "vllm"):
        raise BuildError(f"--engine: expected auto, hf or vllm, got {cfg.engine!r}")
    if cfg.engine == "hf":
        return "hf", None
    gguf = cfg.model.endswith(".gguf")
    python: Path | None
    if cfg.vllm_python:
        python = Path(cfg.vllm_python)
        if not python.is_file():
            raise BuildError(f"--vllm-python: expected a Python interpreter with vLLM at {python}, file missing")
    else:
        try:
            python = find_vllm_python()
        except FileNotFoundError as exc:
            if cfg.engine == "vllm":
                raise BuildError(f"--engine vllm: {exc}") from None
            python = None
    if cfg.engine == "vllm" and gguf:
        raise BuildError("--engine vllm: a .gguf model is generated with --engine hf (convert it to a folder for vLLM)")
    if python is None or gguf:
        return "hf", None
    return "vllm", python


def _check_sae(cfg: BuildConfig, config: Any) -> SAEConfig:
    """The pretrained SAE fits the model and the first hook point, and can be sliced."""
    from monitor.sae import read

    assert cfg.sae is not None
    sae_cfg, _ = read(cfg.sae)  # numpy only; SAEError (one line) for an unreadable folder
    check_hidden_size(config, sae_cfg.d_in, "sae d_in")
    first = cfg.hook_points[0]
    if sae_cfg.hook_point and sae_cfg.hook_point != first:
        raise BuildError(
            f"--sae: the SAE reads {sae_cfg.hook_point}, but the detectors are fitted at the first --hook-point "
            f"{first}; put {sae_cfg.hook_point} first"
        )
    if sae_cfg.architecture == "topk":
        raise BuildError(
            "--sae: a TopK SAE cannot be sliced (whether a latent survives depends on all the others), so its SAE "
            "probes could not be served; pass a ReLU or JumpReLU SAE, or train one with --d-sae"
        )
    if sae_cfg.d_sae < MIN_LATENTS:
        raise BuildError(
            f"--sae: expected at least {MIN_LATENTS} latents (the SAE probes use up to 32), got {sae_cfg.d_sae}"
        )
    return sae_cfg


def _check_training(cfg: BuildConfig) -> None:
    t = cfg.training
    assert t is not None
    if t.architecture not in ("relu", "jumprelu"):
        raise BuildError(
            "--sae-architecture: expected relu or jumprelu (a TopK SAE cannot be sliced for serving), "
            f"got {t.architecture!r}"
        )
    if t.d_sae < MIN_LATENTS:
        raise BuildError(
            f"--d-sae: expected at least {MIN_LATENTS} (the SAE probes use up to 32 latents), got {t.d_sae}"
        )
    if t.tokens <= t.eval_tokens + t.batch_size:
        raise BuildError(
            "--sae-tokens: expected more than --sae-eval-tokens + --sae-batch-size "
            f"({t.eval_tokens} + {t.batch_size}), got {t.tokens}"
        )


def _check_out(cfg: BuildConfig) -> None:
    """``--out`` may be new, or hold an earlier build for the same model (it is rebuilt)."""
    manifest = Path(cfg.out) / "bundle.yaml"
    if not manifest.is_file():
        return
    try:
        model = (yaml.safe_load(manifest.read_text()) or {}).get("model")
    except yaml.YAMLError:
        model = None
    if model != cfg.resolved_model_id:
        raise BuildError(
            f"--out: {cfg.out} holds a bundle for {model!r}, not {cfg.resolved_model_id!r}; choose another folder"
        )
