"""What the pipeline takes in and gives back: plain frozen dataclasses, no behaviour.

The server converts wire messages into the inputs and the results back into replies;
``monitor.metrics`` and ``monitor.audit`` read the results. Nothing here validates or scores.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from monitor.detectors import DetectorResult
from monitor.hook_points import HookStats
from monitor.tensors import WireTensor

__all__ = ["ActivationInput", "ChunkInput", "Limits", "ScoreInput", "ScoreResult", "StreamVerdict"]


@dataclass(frozen=True)
class Limits:
    """Bounds a request must respect (tokens per block, tokens per stream)."""

    max_tokens: int = 8192
    max_stream_tokens: int = 65536


@dataclass(frozen=True)
class ActivationInput:
    """Activations of one hook point as received (still undecoded)."""

    hook_point: str
    tensor: WireTensor
    projected: bool = False


@dataclass(frozen=True)
class ScoreInput:
    """One finished generation as the pipeline sees it."""

    request_id: str
    model: str
    prompt: str = ""
    output: str = ""
    activations: Sequence[ActivationInput] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    decision: Sequence[ActivationInput] = ()  # [1, width] at the last prompt-template token, per hook point


@dataclass(frozen=True)
class ChunkInput:
    """One chunk of a running generation; identity fields matter on the first chunk only."""

    request_id: str = ""
    model: str = ""
    prompt: str = ""
    text_delta: str = ""
    activations: Sequence[ActivationInput] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    final: bool = False
    decision: Sequence[ActivationInput] = ()  # at most once per stream per hook point


@dataclass(frozen=True)
class ScoreResult:
    """What the pipeline concluded about one finished generation."""

    request_id: str
    model: str
    hook_stats: tuple[HookStats, ...]
    text_stats: Mapping[str, float]
    flagged: bool
    seconds: float
    bytes_received: int
    detectors: tuple[DetectorResult, ...] = ()
    change_points: tuple[str, ...] = ()  # drift metrics whose change detector fired (set by ``observe_drift``)


@dataclass(frozen=True)
class StreamVerdict:
    """The running verdict after one chunk of a stream."""

    request_id: str
    model: str
    chunk_index: int
    tokens_seen: int
    new_tokens: Mapping[str, int]
    new_bytes: int
    hook_stats: tuple[HookStats, ...]
    text_stats: Mapping[str, float]
    halt: bool
    reason: str
    final: bool
    seconds: float
    detectors: tuple[DetectorResult, ...] = ()
    halted_now: bool = False  # this chunk is the one that first advised HALT
    change_points: tuple[str, ...] = ()  # on the final chunk: drift change points (set by ``observe_drift``)
