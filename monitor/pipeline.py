"""The per-request path: validate -> decode -> detectors -> text statistics -> result objects.

The server and the bulk paths call ``Pipeline.score`` for a finished generation and
``Pipeline.open_stream`` for a running one. Results are plain dataclasses; metrics are
recorded from them by ``monitor.metrics``, never here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np

from monitor.detectors import Bundle, DetectorResult, DetectorSet, HookPoint, RunningScores
from monitor.drift import DriftMonitor
from monitor.errors import InvalidInput
from monitor.hook_points import HookStats
from monitor.tensors import WireTensor, decode, require_finite
from monitor.text import text_statistics

__all__ = [
    "DETECTOR_PREFIX",
    "ActivationInput",
    "ChunkInput",
    "HookStats",
    "Limits",
    "Pipeline",
    "ScoreInput",
    "ScoreResult",
    "StreamScorer",
    "StreamVerdict",
    "drift_values",
    "observe_drift",
]

MAX_REQUEST_ID = 128
MAX_LABELS = 8
MAX_LABEL_VALUE = 128
MAX_TEXT_CHARS = 1_000_000
# Largest |value| accepted in an activation. Residual streams of real models stay below ~1e4;
# bounding the input keeps every sum, norm and score finite in float32.
MAX_ABS_ACTIVATION = 1e6
_LABEL_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")


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


R = TypeVar("R", ScoreResult, StreamVerdict)
DETECTOR_PREFIX = "detector."  # drift metrics of detector verdicts (they depend on the bundle)


def drift_values(text_stats: Mapping[str, float], detectors: Sequence[DetectorResult]) -> dict[str, float]:
    """What the drift engine tracks of one finished generation: its text statistics and detector verdicts."""
    values = {f"text.{k}": v for k, v in text_stats.items()}
    for r in detectors:
        values[f"{DETECTOR_PREFIX}{r.name}.probability"] = r.probability
        values[f"{DETECTOR_PREFIX}{r.name}.fired"] = float(r.fired)
    return values


def observe_drift(drift: DriftMonitor, result: R) -> R:
    """Record a finished generation in ``drift``; returns the result with the change points it caused.

    Scoring never touches drift: the server calls this once per generation it acknowledges (a
    final stream verdict, a Score or Ingest result), so evaluation and benches that call
    ``Pipeline.score`` leave the drift state alone.
    """
    if isinstance(result, StreamVerdict) and not result.final:
        return result
    changes = tuple(drift.update(drift_values(result.text_stats, result.detectors)))
    return dataclasses.replace(result, change_points=changes) if changes else result


@dataclass
class _HookAccumulator:
    """Running sums for one hook point, so a stream's stats cost O(1) memory."""

    hook_point: str
    tokens: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0

    normed: int = 0  # tokens with full activations (projected tokens have no residual norm)

    def add(self, tokens: int, norms: np.ndarray | None) -> None:
        self.tokens += tokens
        if norms is not None and norms.size:
            self.normed += int(norms.size)
            self.norm_sum += float(norms.sum(dtype=np.float64))
            self.norm_max = max(self.norm_max, float(norms.max()))

    def stats(self) -> HookStats:
        mean = self.norm_sum / self.normed if self.normed else 0.0
        return HookStats(self.hook_point, self.tokens, mean, self.norm_max)


class Pipeline:
    """Scores generations against a loaded bundle.

    >>> from monitor.detectors import Bundle
    >>> from monitor.tensors import encode
    >>> import numpy as np
    >>> p = Pipeline(Bundle.load())
    >>> x = np.full((4, 576), 0.5, dtype=np.float32)
    >>> r = p.score(ScoreInput("r1", "SmolLM2-135M-Instruct", output="Hi there.",
    ...     activations=[ActivationInput("blocks.16.hook_resid_post", encode(x))]))
    >>> r.hook_stats[0].tokens, round(r.hook_stats[0].mean_l2_norm, 3)
    (4, 12.0)
    """

    def __init__(
        self,
        bundle: Bundle,
        limits: Limits | None = None,
        detectors: DetectorSet | None = None,
    ) -> None:
        self.bundle = bundle
        self.limits = limits or Limits()
        self.detectors = detectors if detectors is not None else DetectorSet.from_bundle(bundle)

    # -- finished generations -------------------------------------------------------------
    def score(self, req: ScoreInput) -> ScoreResult:
        """Validate and score one finished generation; raises ``InvalidInput`` on bad fields."""
        start = time.perf_counter()
        _check_identity(req.request_id, req.model, req.labels, self.bundle)
        _check_text("prompt", req.prompt)
        _check_text("output", req.output)
        if not req.activations:
            raise InvalidInput(
                "activations",
                f"at least one block for hook point {self.bundle.hook_points[0].name}",
                "none",
                reason="missing",
            )
        accs: dict[str, _HookAccumulator] = {}
        nbytes = 0
        running = self.detectors.open_running()
        for i, block in enumerate(req.activations):
            hp, arr = self.decode_block(block, f"activations[{i}]", self.limits.max_tokens)
            if hp.name in accs:
                raise InvalidInput(
                    f"activations[{i}].hook_point",
                    "each hook point at most once per request",
                    f"{hp.name!r} repeated",
                    reason="hook_point",
                )
            acc = accs[hp.name] = _HookAccumulator(hp.name)
            acc.add(arr.shape[0], None if block.projected else _row_norms(arr))
            feats = self.detectors.features(hp.name, arr, block.projected)
            if feats is not None:
                running.update(hp.name, feats)
            nbytes += len(block.tensor.data)
        nbytes += self._fold_decision(req.decision, running, set())
        results = _finite_results(running.results())
        stats = text_statistics(req.prompt, req.output)
        return ScoreResult(
            request_id=req.request_id,
            model=req.model,
            hook_stats=tuple(a.stats() for a in accs.values()),
            text_stats=stats,
            flagged=any(r.fired for r in results),
            seconds=time.perf_counter() - start,
            bytes_received=nbytes,
            detectors=results,
        )

    # -- running generations --------------------------------------------------------------
    def open_stream(self) -> StreamScorer:
        """State for one ScoreStream call; feed it chunks with ``update``."""
        return StreamScorer(self)

    def _fold_decision(self, blocks: Sequence[ActivationInput], running: RunningScores, seen: set[str]) -> int:
        """Validate the decision-position blocks (one row each, each hook point once) and score them."""
        nbytes = 0
        for i, block in enumerate(blocks):
            field_name = f"decision[{i}]"
            hp, arr = self.decode_block(block, field_name, 1 << 30)
            if arr.shape[0] != 1:
                raise InvalidInput(
                    f"{field_name}.activations.shape[0] (tokens)",
                    "exactly 1 (the last prompt-template token)",
                    str(arr.shape[0]),
                    reason="decision",
                )
            if hp.name in seen:
                raise InvalidInput(
                    f"{field_name}.hook_point",
                    "each hook point at most once per request or stream",
                    f"{hp.name!r} repeated",
                    reason="hook_point",
                )
            seen.add(hp.name)
            feats = self.detectors.features(hp.name, arr, block.projected)
            if feats is not None:
                running.update_decision(hp.name, feats)
            nbytes += len(block.tensor.data)
        return nbytes

    def decode_block(self, block: ActivationInput, field_name: str, max_tokens: int) -> tuple[HookPoint, np.ndarray]:
        """Check one block against the bundle and the limits, then decode it; errors name ``field_name``."""
        hp = self.bundle.hook_point(block.hook_point)
        if hp is None:
            names = ", ".join(h.name for h in self.bundle.hook_points)
            raise InvalidInput(
                f"{field_name}.hook_point",
                f"one of [{names}]",
                repr(block.hook_point),
                reason="hook_point",
            )
        width, what = hp.d_model, "d_model"
        if block.projected:
            proj = self.detectors.projection(hp.name)
            if proj is None:
                raise InvalidInput(
                    f"{field_name}.projected",
                    f"false (the bundle has no encoder slice for hook point {hp.name})",
                    "true",
                    reason="projected",
                )
            width, what = proj.width, "projected columns"
        tfield = f"{field_name}.activations"
        shape = block.tensor.shape
        if len(shape) != 2:
            raise InvalidInput(
                f"{tfield}.shape",
                f"rank 2 [tokens, {what}={width}]",
                f"rank {len(shape)} {list(shape)}",
                reason="rank",
            )
        if shape[1] != width:
            raise InvalidInput(
                f"{tfield}.shape[1] ({what})",
                f"{width} for hook point {hp.name}" + (" (the encoder slice's width)" if block.projected else ""),
                str(shape[1]),
                reason="d_model",
            )
        if shape[0] > max_tokens:
            raise InvalidInput(
                f"{tfield}.shape[0] (tokens)",
                f"at most {max_tokens}",
                str(shape[0]),
                reason="too_many_tokens",
            )
        if shape[0] < 1:
            raise InvalidInput(
                f"{tfield}.shape[0] (tokens)",
                "at least 1 token (leave an empty block out)",
                str(shape[0]),
                reason="no_tokens",
            )
        arr = decode(block.tensor, tfield)
        require_finite(arr, tfield, MAX_ABS_ACTIVATION)
        return hp, arr


class StreamScorer:
    """Running state of one ScoreStream: bounded accumulators, one verdict per chunk."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._p = pipeline
        self.request_id = ""
        self.model = ""
        self.chunks = 0
        self.tokens_seen = 0
        self.finished = False
        self._prompt = ""
        self._output_parts: list[str] = []
        self._output_chars = 0
        self._accs: dict[str, _HookAccumulator] = {}
        self._running = pipeline.detectors.open_running()
        self._decision_seen: set[str] = set()
        self.halted = ""

    @property
    def prompt(self) -> str:
        return self._prompt

    @property
    def output(self) -> str:
        """The output text received so far."""
        return "".join(self._output_parts)

    def update(self, chunk: ChunkInput) -> StreamVerdict:
        """Validate and fold in one chunk; raises ``InvalidInput`` (the stream should end)."""
        start = time.perf_counter()
        if self.finished:
            raise InvalidInput("final", "no chunks after a chunk with final=true", "another chunk")
        if self.chunks == 0:
            _check_identity(chunk.request_id, chunk.model, chunk.labels, self._p.bundle)
            _check_text("prompt", chunk.prompt)
            self.request_id, self.model, self._prompt = chunk.request_id, chunk.model, chunk.prompt
        elif chunk.request_id and chunk.request_id != self.request_id:
            raise InvalidInput(
                "request_id", f"{self.request_id!r} (as in the stream's first chunk)", repr(chunk.request_id)
            )
        self._output_chars += len(chunk.text_delta)
        if self._output_chars > MAX_TEXT_CHARS:
            raise InvalidInput("text_delta", f"at most {MAX_TEXT_CHARS} characters in all", str(self._output_chars))
        new_tokens: dict[str, int] = {}
        nbytes = 0
        budget = self._p.limits.max_stream_tokens - self.tokens_seen
        for i, block in enumerate(chunk.activations):
            field_name = f"activations[{i}]"
            hp, arr = self._p.decode_block(block, field_name, self._p.limits.max_tokens)
            if hp.name in new_tokens:
                raise InvalidInput(
                    f"{field_name}.hook_point",
                    "each hook point at most once per chunk",
                    f"{hp.name!r} repeated",
                    reason="hook_point",
                )
            if arr.shape[0] > budget:
                raise InvalidInput(
                    f"{field_name}.activations.shape[0] (tokens)",
                    f"at most {self._p.limits.max_stream_tokens} tokens per stream ({budget} left)",
                    str(arr.shape[0]),
                    reason="too_many_tokens",
                )
            acc = self._accs.setdefault(hp.name, _HookAccumulator(hp.name))
            acc.add(arr.shape[0], None if block.projected else _row_norms(arr))
            feats = self._p.detectors.features(hp.name, arr, block.projected)
            if feats is not None:
                self._running.update(hp.name, feats)
            new_tokens[hp.name] = int(arr.shape[0])
            nbytes += len(block.tensor.data)
        nbytes += self._p._fold_decision(chunk.decision, self._running, self._decision_seen)
        self._output_parts.append(chunk.text_delta)
        self.tokens_seen += max(new_tokens.values(), default=0)
        index = self.chunks
        self.chunks += 1
        self.finished = chunk.final
        if chunk.final and self.tokens_seen == 0 and not self._decision_seen:
            # A decision row alone is enough: a 1-token answer has no response row (its only token
            # is never fed back through the model), and the prompt detectors still read the decision.
            raise InvalidInput(
                "activations",
                "at least one activation or decision row over the stream (a stream without either scores nothing)",
                "none by the final chunk",
                reason="missing",
            )
        results = _finite_results(self._running.results())
        if chunk.final:  # full statistics once, on the whole output; chunks get the cheap ones
            output = self.output
            self._output_parts = [output]
            stats = text_statistics(self._prompt, output)
        else:
            stats = {"output_chars": float(self._output_chars), "prompt_chars": float(len(self._prompt))}
        halted_now = False
        if not self.halted:
            self.halted = _halt_reason(results)
            halted_now = bool(self.halted)
        return StreamVerdict(
            request_id=self.request_id,
            model=self.model,
            chunk_index=index,
            tokens_seen=self.tokens_seen,
            new_tokens=new_tokens,
            new_bytes=nbytes,
            hook_stats=tuple(a.stats() for a in self._accs.values()),
            text_stats=stats,
            halt=bool(self.halted),
            reason=self.halted,
            final=chunk.final,
            seconds=time.perf_counter() - start,
            detectors=results,
            halted_now=halted_now,
        )


def _halt_reason(results: Sequence[DetectorResult]) -> str:
    """Why a stream should stop: the first critical detector that reads the answer and whose running
    or recent score fired, once it has seen ``halt_min_tokens`` tokens of the answer (a few tokens'
    mean is too noisy to stop on). A detector that reads only the prompt may warn, never halt: it
    describes the request, and would stop an honest answer or a refusal as readily as a bad one."""
    for r in results:
        if not (r.critical and r.reads_answer and r.tokens >= r.halt_min_tokens):
            continue
        if r.fired or r.recent_score >= r.threshold:
            which = "score" if r.fired else "recent score"
            value = r.score if r.fired else r.recent_score
            return f"{r.name} fired: {which} {value:.3f} >= threshold {r.threshold:.3f}"
    return ""


def _finite_results(results: Sequence[DetectorResult]) -> tuple[DetectorResult, ...]:
    """The results, or ``InvalidInput`` when an input drove a score to NaN/Inf (never emitted)."""
    out = tuple(results)
    for r in out:
        if not (math.isfinite(r.score) and math.isfinite(r.probability) and math.isfinite(r.recent_score)):
            raise InvalidInput(
                "activations",
                f"values that give detector {r.name} a finite score",
                f"score {r.score}, probability {r.probability}",
                reason="non_finite",
            )
    return out


def _row_norms(arr: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))


def _check_identity(request_id: str, model: str, labels: Mapping[str, str], bundle: Bundle) -> None:
    if not request_id or len(request_id) > MAX_REQUEST_ID:
        raise InvalidInput(
            "request_id", f"1..{MAX_REQUEST_ID} characters", f"{len(request_id)} characters", reason="request_id"
        )
    if model not in bundle.accepted_models:
        raise InvalidInput(
            "model", f"one of {list(bundle.accepted_models)} (the loaded bundle's model)", repr(model), reason="model"
        )
    if len(labels) > MAX_LABELS:
        raise InvalidInput("labels", f"at most {MAX_LABELS} entries", f"{len(labels)} entries", reason="labels")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidInput(
                f"labels[{key[:40]!r}]", "a key matching [a-z_][a-z0-9_]{0,31}", repr(key[:40]), reason="labels"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidInput(
                f"labels[{key!r}]", f"at most {MAX_LABEL_VALUE} characters", f"{len(value)} characters", reason="labels"
            )


def _check_text(name: str, text: str) -> None:
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInput(name, f"at most {MAX_TEXT_CHARS} characters", f"{len(text)} characters", reason="text_size")
