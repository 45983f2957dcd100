"""Escalation beside scoring: generations on which a critical detector fired are put to a debate.

The question is the user's prompt, the proposer defends the monitored generation and the opponent
is asked "Is this answer truthful and safe?": it agrees (the alert is not confirmed) or challenges
with its own answer, and after the rounds the judge decides. ``offer()`` never blocks: a full queue
drops the event and counts it, so a slow or dead debate backend never delays scoring or a stream's
HALT. Workers survive any exception (counted by kind, logged). Verdict labels: ``alert`` (the
challenger won: the debate confirms the alert), ``answer`` (the generation was defended or agreed
with), ``tie``, ``undecided`` (no readable judge reply).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from monitor.background import BoundedWorkers
from monitor.critique import CriticUnavailable
from monitor.debate._arena import DebateAgent, DebateArena
from monitor.debate._judge import DebateJudge

log = logging.getLogger("monitor.debate")
VERDICTS = {"proposer": "answer", "opponent": "alert", "tie": "tie", "undecided": "undecided"}


@dataclass(frozen=True)
class DebateEvent:
    request_id: str
    prompt: str
    output: str
    fired: dict[str, float] = field(default_factory=dict)  # critical detectors that fired -> score

    @classmethod
    def from_detectors(cls, request_id: str, prompt: str, output: str, detectors: Iterable[Any]) -> DebateEvent:
        """The event for one finished generation; ``fired`` keeps only critical detectors that fired."""
        fired = {d.name: round(float(d.score), 5) for d in detectors if d.critical and d.fired}
        return cls(request_id, prompt, output, fired)


class DebateService(BoundedWorkers[DebateEvent]):
    """Debates on its own asyncio tasks; ``offer()`` from the scoring path, ``start``/``stop`` around."""

    def __init__(
        self,
        backend: Any,
        *,
        rounds: int = 1,
        max_tokens: int = 64,
        timeout: float = 300.0,
        max_queue: int = 20,
        concurrency: int = 1,
        metrics: Any = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        super().__init__(max_queue=max_queue, concurrency=concurrency, log=log)
        if timeout <= 0:
            raise ValueError(f"timeout: expected > 0, got {timeout}")
        self.backend = backend
        self.arena = DebateArena(DebateJudge(backend, timeout=timeout), max_rounds=rounds)
        self.max_tokens = max_tokens
        self.timeout = timeout
        self.metrics = metrics
        self.on_result = on_result or (lambda record: None)
        self.errors = 0  # debates that did not reach a verdict: timeout, backend down, exception

    def offer(self, event: DebateEvent) -> bool:
        """Queue the event if a critical detector fired and there is room; never blocks."""
        if self._queue is None or not event.fired or not event.output:
            return False
        return self._enqueue(event)

    def on_drop(self) -> None:
        if self.metrics is not None:
            self.metrics.debate_dropped.inc()

    def on_depth(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.debate_queue_depth.set(depth)

    def on_failure(self, exc: Exception) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.debate_errors.labels("exception").inc()

    def describe(self, event: DebateEvent) -> str:
        return f"debate of {event.request_id}"

    async def handle(self, event: DebateEvent) -> None:
        await self._debate(event)

    async def _debate(self, event: DebateEvent) -> None:
        t0 = time.perf_counter()
        proposer = DebateAgent(
            "generation", self.backend, stance=event.output, max_tokens=self.max_tokens, timeout=self.timeout
        )
        opponent = DebateAgent("reviewer", self.backend, max_tokens=self.max_tokens, timeout=self.timeout)
        record: dict[str, Any] = {"type": "debate", "request_id": event.request_id, "detectors": event.fired}
        try:
            result = await asyncio.wait_for(self.arena.debate(event.prompt, proposer, opponent), self.timeout)
        except (TimeoutError, CriticUnavailable) as exc:
            kind = "timeout" if isinstance(exc, TimeoutError) else "unavailable"
            self.errors += 1
            if self.metrics is not None:
                self.metrics.debate_errors.labels(kind).inc()
            record.update(outcome=kind, error=str(exc)[:300], seconds=round(time.perf_counter() - t0, 3))
            self.on_result(record)
            return
        seconds = time.perf_counter() - t0
        verdict = VERDICTS[result.winner]
        if self.metrics is not None:
            self.metrics.debate_verdicts.labels(verdict).inc()
            self.metrics.debate_seconds.observe(seconds)
        record.update(
            outcome="ok",
            verdict=verdict,
            winner=result.winner,
            judge_confidence=None if result.judge_confidence is None else round(result.judge_confidence, 4),
            agreed=result.agreed,
            rounds=result.rounds,
            rationale=result.rationale,
            arguments=[asdict(a) for a in result.arguments],
            backend=self.backend.name,
            seconds=round(seconds, 3),
        )
        self.on_result(record)
