"""What callers hand the client and what they get back (plain dataclasses, no protobuf)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from monitor.pipeline import HookStats

__all__ = [
    "Catalog",
    "ChunkVerdict",
    "DetectorVerdict",
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


@dataclass(frozen=True)
class FeatureInfo:
    latent: int
    activation: float
    contribution: float
    label: str


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
class HookPointInfo:
    name: str
    d_model: int
    max_tokens: int


@dataclass(frozen=True)
class Catalog:
    model: str
    bundle_name: str
    bundle_version: str
    hook_points: tuple[HookPointInfo, ...]
    detectors: tuple[str, ...]
