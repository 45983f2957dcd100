"""The critique -> revision loop, and the preference pairs it leaves behind (RLAIF data).

At most ``max_revisions`` rounds (default 3). A round critiques the current response; it stops
when no principle is violated ("clean") or when the revision does not change the response
("unchanged"), as the seed pipeline does; otherwise the revision replaces the response and the
(original, revised) pair is appended to the preference JSONL: prompt, chosen, rejected, violated
principles, confidence.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitor._jsonl import jsonl_line
from monitor.critique._critic import Critic, Verdict


@dataclass
class RevisionOutcome:
    """What the loop did: the final response, why it stopped, every round's verdicts and pairs."""

    prompt: str
    original: str
    final: str
    stop_reason: str  # clean | unchanged | max_revisions
    rounds: list[list[Verdict]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)


class PreferenceLog:
    """Appends preference pairs to a JSONL file (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def append(self, pair: dict[str, Any]) -> None:
        with self._lock, self.path.open("a", encoding="utf-8") as f:
            f.write(jsonl_line(pair))


def _same(a: str, b: str) -> bool:
    return " ".join(a.split()) == " ".join(b.split())


async def revise_until_clean(
    critic: Critic,
    prompt: str,
    response: str,
    *,
    max_revisions: int = 3,
    principles: list[str] | None = None,
    log: PreferenceLog | None = None,
) -> RevisionOutcome:
    """Critique and revise until clean, unchanged, or ``max_revisions`` revisions."""
    if max_revisions < 0:
        raise ValueError(f"max_revisions: expected >= 0, got {max_revisions}")
    out = RevisionOutcome(prompt, response, response, "max_revisions")
    current = response
    for _ in range(max_revisions + 1):
        verdicts = await critic.critique(prompt, current, principles)
        out.rounds.append(verdicts)
        violated = [v for v in verdicts if v.violated and not v.parse_error]
        if not violated:
            out.stop_reason = "clean"
            break
        if len(out.pairs) == max_revisions:
            out.stop_reason = "max_revisions"
            break
        revised = await critic.revise(prompt, current, violated)
        if not revised or _same(revised, current):
            out.stop_reason = "unchanged"
            break
        pair = {
            "prompt": prompt,
            "chosen": revised,
            "rejected": current,
            "violated": [v.principle for v in violated],
            "confidence": round(min(v.confidence for v in violated), 4),
            "critic": critic.backend.name,
            "mode": critic.mode,
        }
        out.pairs.append(pair)
        if log is not None:
            log.append(pair)
        current = revised
    out.final = current
    return out
