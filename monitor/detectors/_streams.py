"""Replaying labeled generations as streams: what fires and what halts, as ``ScoreStream`` would decide.

A critical detector is judged by the share of ordinary streams it halts, not only by a
per-response FPR: a stream is scored chunk by chunk, and one verdict over the threshold (running
or recent score) is enough. This module replays activations through the pipeline's stream scorer
(the code behind ``ScoreStream``): the decision row with the first chunk, then ``chunk_tokens``
response tokens per chunk, the last one final.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.detectors._bundle import Bundle
from monitor.detectors._scoring import DetectorSet

CHUNK_TOKENS = 16


@dataclass(frozen=True)
class StreamOutcome:
    """One replayed stream: detectors that fired, the HALT reason ("" when none), and per detector
    the highest score a HALT could have rested on (running or recent, once enough answer tokens)."""

    fired: frozenset[str]
    halt: str
    peak: dict[str, float]


def replay_streams(
    bundle: Bundle,
    detectors: DetectorSet,
    tokens: Sequence[np.ndarray],
    decision: Sequence[np.ndarray],
    chunk_tokens: int = CHUNK_TOKENS,
) -> list[StreamOutcome]:
    """Replay each (decision row, response tokens) pair as one stream through the pipeline."""
    from monitor.pipeline import ActivationInput, ChunkInput, Pipeline
    from monitor.tensors import encode

    pipeline = Pipeline(bundle, detectors=detectors)
    hook = bundle.hook_points[0].name
    out = []
    for toks, dec in zip(tokens, decision, strict=True):
        stream = pipeline.open_stream()
        starts = list(range(0, max(len(toks), 1), chunk_tokens))
        fired: set[str] = set()
        peak: dict[str, float] = {}
        reason = ""
        for n, a in enumerate(starts):
            part = np.ascontiguousarray(toks[a : a + chunk_tokens], dtype=np.float32)
            v = stream.update(
                ChunkInput(
                    request_id="replay",
                    model=bundle.model,
                    activations=[ActivationInput(hook, encode(part))] if len(part) else [],
                    decision=[ActivationInput(hook, encode(np.asarray(dec, dtype=np.float32)))] if n == 0 else [],
                    final=n == len(starts) - 1,
                )
            )
            for r in v.detectors:
                if r.fired:
                    fired.add(r.name)
                if r.tokens >= r.halt_min_tokens and r.reads_answer:
                    peak[r.name] = max(peak.get(r.name, -np.inf), r.score, r.recent_score)
            reason = reason or v.reason
        out.append(StreamOutcome(frozenset(fired), reason, peak))
    return out


def threshold_for_halt_rate(peaks: Sequence[float], rate: float) -> float:
    """The lowest threshold at which at most ``rate`` of these streams reach it (just above the
    highest peak that must stay below it).

    >>> t = threshold_for_halt_rate([0.1, 0.2, 0.3, 0.9], 0.25)
    >>> 0.3 < t < 0.3 + 1e-9
    True
    """
    top = np.sort(np.asarray(peaks, dtype=np.float64))
    allowed = int(np.floor(rate * len(top)))
    if allowed == 0:
        return float(np.nextafter(top[-1], np.inf))
    return float(np.nextafter(top[len(top) - allowed - 1], np.inf))
