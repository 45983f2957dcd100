"""Statistics over a history of debates, and the Wilson interval the experiment reports."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from monitor.debate._types import DebateResult


@dataclass(frozen=True)
class DebateStats:
    debates: int
    proposer_share: float
    opponent_share: float
    ties: int
    undecided: int  # judge replies with no readable label: counted, never guessed
    agreed: int
    mean_judge_confidence: float | None  # over judged debates with a confidence
    mean_rounds: float


def debate_statistics(history: Iterable[DebateResult]) -> DebateStats:
    """Debates, each side's win share (of all debates), ties, undecided, mean confidence and rounds."""
    h = list(history)
    n = len(h)
    if n == 0:
        return DebateStats(0, 0.0, 0.0, 0, 0, 0, None, 0.0)
    confs = [r.judge_confidence for r in h if r.judge_confidence is not None]
    return DebateStats(
        debates=n,
        proposer_share=sum(r.winner == "proposer" for r in h) / n,
        opponent_share=sum(r.winner == "opponent" for r in h) / n,
        ties=sum(r.winner == "tie" for r in h),
        undecided=sum(r.winner == "undecided" for r in h),
        agreed=sum(r.agreed for r in h),
        mean_judge_confidence=sum(confs) / len(confs) if confs else None,
        mean_rounds=sum(r.rounds for r in h) / n,
    )


def wilson_interval(successes: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (well-behaved at small n and near 0 or 1).

    >>> [round(x, 3) for x in wilson_interval(50, 100)]
    [0.404, 0.596]
    """
    if n <= 0:
        raise ValueError(f"n: expected > 0, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes: expected 0..{n}, got {successes}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
