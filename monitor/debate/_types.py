"""The debate's vocabulary (the seed's): arguments and results."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Argument:
    """One contribution to a debate. ``round`` 0 is the opening answer."""

    role: str  # proposer | opponent
    content: str
    evidence: tuple[str, ...] = ()
    round: int = 0
    confidence: float | None = None  # the speaker's own P(agree) where it was asked; None otherwise


@dataclass(frozen=True)
class DebateResult:
    """The outcome. ``winner``: proposer, opponent, tie or undecided (the last two are counted, not guessed)."""

    question: str
    winner: str
    winning_answer: str
    judge_confidence: float | None
    rounds: int
    arguments: tuple[Argument, ...]
    rationale: str
    agreed: bool = False  # the opponent agreed with the proposer: no rounds were argued
    proposer_answer: str = ""
    opponent_answer: str = ""
    meta: dict[str, str] = field(default_factory=dict)
