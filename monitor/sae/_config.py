"""``SAEConfig``: everything needed to rebuild an SAE besides its weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitor.errors import MonitorError

ARCHITECTURES = ("relu", "jumprelu", "topk")
# Conversations ``monitor collect`` reads by default (here, not in ``_collect``: the CLI needs it without torch).
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "data" / "chat_corpus" / "conversations.jsonl.gz"
NORMALISATIONS = ("none", "expected_average_only_in")
DTYPES = ("float32", "float16", "bfloat16")


class SAEError(MonitorError, ValueError):
    """An SAE file, config or argument is invalid; the message names the key."""


@dataclass(frozen=True)
class SAEConfig:
    """Shape, architecture and provenance of a sparse autoencoder.

    d_in: width of the activations it reads (d_model of the hook point).
    d_sae: number of latents.
    architecture: "relu" (standard), "jumprelu" (per-latent threshold) or "topk".
    k: latents kept per token (topk only).
    dtype: storage dtype of the weights ("float32", "float16", "bfloat16").
    hook_point: where in the model the activations come from (e.g. "blocks.16.hook_resid_post").
    model_id: the model the SAE was trained on.
    apply_b_dec_to_input: subtract b_dec from the input before encoding.
    normalize_activations: "none", or "expected_average_only_in": inputs are multiplied by
        ``norm_scaling_factor`` before encoding and outputs divided by it.
    norm_scaling_factor: the factor above (None when normalize_activations is "none").
    """

    d_in: int
    d_sae: int
    architecture: str = "relu"
    k: int | None = None
    dtype: str = "float32"
    hook_point: str = ""
    model_id: str = ""
    apply_b_dec_to_input: bool = True
    normalize_activations: str = "none"
    norm_scaling_factor: float | None = None

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.d_sae < 1:
            raise SAEError(f"d_in, d_sae: expected positive sizes, got {self.d_in}, {self.d_sae}")
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"architecture: expected one of {', '.join(ARCHITECTURES)}, got {self.architecture!r}")
        if self.architecture == "topk" and not (self.k and 0 < self.k <= self.d_sae):
            raise SAEError(f"k: expected 1..{self.d_sae} for a topk SAE, got {self.k!r}")
        if self.dtype not in DTYPES:
            raise SAEError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.normalize_activations not in NORMALISATIONS:
            raise SAEError(
                f"normalize_activations: expected one of {', '.join(NORMALISATIONS)}, "
                f"got {self.normalize_activations!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise SAEError(f"SAE config: unknown keys {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)
