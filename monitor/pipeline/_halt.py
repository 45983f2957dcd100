"""The HALT policy: when a running generation's detector results say the engine should stop it."""

from __future__ import annotations

from collections.abc import Sequence

from monitor.detectors import DetectorResult

__all__ = ["halt_reason"]


def halt_reason(results: Sequence[DetectorResult]) -> str:
    """Why a stream should stop ("" to go on): the first critical detector that reads the answer and
    whose running or recent score fired, once it has seen ``halt_min_tokens`` tokens of the answer (a
    few tokens' mean is too noisy to stop on). A detector that reads only the prompt may warn, never
    halt: it describes the request, and would stop an honest answer or a refusal as readily as a bad one.
    """
    for r in results:
        if not (r.critical and r.reads_answer and r.tokens >= r.halt_min_tokens):
            continue
        if r.fired or r.recent_score >= r.threshold:
            which = "score" if r.fired else "recent score"
            value = r.score if r.fired else r.recent_score
            return f"{r.name} fired: {which} {value:.3f} >= threshold {r.threshold:.3f}"
    return ""
