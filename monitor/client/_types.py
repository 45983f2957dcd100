"""What callers hand the client and what they get back (plain dataclasses, no protobuf)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monitor.hook_points import HookStats

__all__ = [
    "Catalog",
    "ChunkVerdict",
    "DetectorInfo",
    "DetectorVerdict",
    "EncoderSlice",
    "Generation",
    "HookPointInfo",
    "HookStats",
    "IngestReport",
    "ScoreReply",
]


@dataclass(frozen=True)
class Generation:
    """One finished generation to score.

    activations maps hook point name -> array ``[tokens, d_model]`` (numpy, or a torch tensor on
    any device; f32, f16 or bf16). ``submit()`` takes ownership: do not modify the arrays after.
    """

    request_id: str
    model: str
    prompt: str = ""
    output: str = ""
    activations: Mapping[str, Any] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)
    projected: bool = False  # activations are [tokens, K] from the catalog's encoder slice
    # hook point -> [1, d_model] (or [1, K] projected) at the last prompt-template token; read by
    # prompt detectors such as deception and harmfulness (optional: without it they report nothing)
    decision: Mapping[str, Any] = field(default_factory=dict)
    # the W3C ``traceparent`` of the request that produced it (e.g. the inference server's incoming
    # header): the sidecar's evaluation events and metric exemplars then carry that trace
    traceparent: str = ""


@dataclass(frozen=True)
class FeatureInfo:
    latent: int
    activation: float
    contribution: float
    label: str
    example: str = ""


@dataclass(frozen=True)
class DetectorVerdict:
    detector: str
    behaviour: str
    score: float
    probability: float
    threshold: float
    fired: bool
    severity: str
    top_features: tuple[FeatureInfo, ...] = ()
    recent_score: float = 0.0
    critical: bool = False


@dataclass(frozen=True)
class ScoreReply:
    request_id: str
    hook_stats: tuple[HookStats, ...]
    text_stats: Mapping[str, float]
    detectors: tuple[DetectorVerdict, ...]
    flagged: bool
    server_seconds: float


@dataclass(frozen=True)
class ChunkVerdict:
    request_id: str
    chunk_index: int
    tokens_seen: int
    hook_stats: tuple[HookStats, ...]
    text_stats: Mapping[str, float]
    detectors: tuple[DetectorVerdict, ...]
    halt: bool
    reason: str
    final: bool


@dataclass(frozen=True)
class IngestReport:
    received: int
    accepted: int
    rejected: int
    flagged: int
    errors: tuple[tuple[int, str, str], ...] = ()  # (index, request_id, message)


@dataclass(frozen=True)
class EncoderSlice:
    """The projection for projected mode: send ``project(x)`` ([tokens, K]) instead of x ([tokens, d_model])."""

    latent_ids: tuple[int, ...]
    w_enc: Any  # numpy [d_model, K]
    b_enc: Any  # numpy [K]
    dense_columns: int

    @property
    def width(self) -> int:
        return int(self.w_enc.shape[1])

    def project(self, x: Any) -> Any:
        """Pre-activations of the K columns for activations ``x`` ([tokens, d_model], numpy or torch)."""
        if hasattr(x, "detach"):
            import torch

            w = torch.as_tensor(self.w_enc, device=x.device)
            return x.to(torch.float32) @ w + torch.as_tensor(self.b_enc, device=x.device)
        return x.astype("float32") @ self.w_enc + self.b_enc


@dataclass(frozen=True)
class HookPointInfo:
    name: str
    d_model: int
    max_tokens: int
    encoder_slice: EncoderSlice | None = None


@dataclass(frozen=True)
class DetectorInfo:
    name: str
    behaviour: str
    kind: str
    hook_point: str
    threshold: float
    critical: bool
    aggregation: str
    target_fpr: float
    latent_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Catalog:
    model: str
    bundle_name: str
    bundle_version: str
    hook_points: tuple[HookPointInfo, ...]
    detectors: tuple[str, ...]
    detector_infos: tuple[DetectorInfo, ...] = ()
