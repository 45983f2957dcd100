"""Critique as a service beside scoring: a policy, a bounded queue, a concurrency limit, timeouts.

Which events get critiqued is a policy (every flagged event, plus a sampled fraction of the rest).
``offer()`` never blocks: a full queue drops the event and counts it, so a slow or dead critic can
never delay scoring. Workers call the critic with a per-call timeout; outcomes are counted per
principle and verdict and handed to ``on_result`` (the audit log; high severity also counts as an
alert).
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from monitor.background import BoundedWorkers
from monitor.critique._backends import CriticUnavailable
from monitor.critique._critic import Critic, Verdict

log = logging.getLogger("monitor.critique")


@dataclass(frozen=True)
class CritiquePolicy:
    """Which finished generations are critiqued."""

    flagged: bool = True  # every generation a detector flagged
    sample_rate: float = 0.05  # and this share of the others
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate: expected 0..1, got {self.sample_rate}")


@dataclass(frozen=True)
class CritiqueEvent:
    request_id: str
    prompt: str
    output: str
    flagged: bool


class CritiqueService(BoundedWorkers[CritiqueEvent]):
    """Runs critiques on its own asyncio tasks; ``offer()`` from the scoring path, ``start``/``stop`` around."""

    def __init__(
        self,
        critic: Critic,
        policy: CritiquePolicy | None = None,
        *,
        max_queue: int = 100,
        concurrency: int = 2,
        metrics: Any = None,
        on_result: Callable[[dict[str, Any]], None] | None = None,
        principles: list[str] | None = None,
    ) -> None:
        super().__init__(max_queue=max_queue, concurrency=concurrency, log=log)
        self.critic = critic
        self.policy = policy or CritiquePolicy()
        self.metrics = metrics
        self.on_result = on_result or (lambda record: None)
        self.principles = principles
        self._rng = random.Random(self.policy.seed)

    def wants(self, flagged: bool) -> bool:
        """The policy's decision for one finished generation."""
        return (flagged and self.policy.flagged) or self._rng.random() < self.policy.sample_rate

    def offer(self, event: CritiqueEvent) -> bool:
        """Queue the event if the policy wants it and there is room; never blocks. True when queued."""
        if self._queue is None or not self.wants(event.flagged):
            return False
        return self._enqueue(event)

    def on_drop(self) -> None:
        if self.metrics is not None:
            self.metrics.critique_dropped.inc()

    def on_depth(self, depth: int) -> None:
        if self.metrics is not None:
            self.metrics.critique_queue_depth.set(depth)

    def on_failure(self, exc: Exception) -> None:
        if self.metrics is not None:
            self.metrics.critiques.labels("*", "failed").inc()

    def describe(self, event: CritiqueEvent) -> str:
        return f"critique of {event.request_id}"

    async def handle(self, event: CritiqueEvent) -> None:
        await self._critique(event)

    async def _critique(self, event: CritiqueEvent) -> None:
        t0 = time.perf_counter()
        verdicts: list[Verdict] = []
        outcome = "ok"
        try:
            verdicts = await self.critic.critique(event.prompt, event.output, self.principles)
        except TimeoutError:
            outcome = "timeout"
        except CriticUnavailable:
            outcome = "error"
        except Exception as exc:  # anything a critic reply can trigger (malformed JSON, odd shapes)
            outcome = "error"
            log.warning("critique of %s: %s: %s", event.request_id, type(exc).__name__, exc)
        seconds = time.perf_counter() - t0
        if self.metrics is not None:
            self.metrics.critique_seconds.observe(seconds)
            if outcome != "ok":
                self.metrics.critiques.labels("*", outcome).inc()
            for v in verdicts:
                verdict = "parse_failure" if v.parse_error else ("violated" if v.violated else "clean")
                self.metrics.critiques.labels(v.principle, verdict).inc()
                if v.parse_error:
                    self.metrics.critique_parse_failures.labels(v.principle).inc()
                if v.violated and v.severity == "high":
                    self.metrics.critique_high_severity.labels(v.principle).inc()
        self.on_result(
            {
                "type": "critique",
                "request_id": event.request_id,
                "outcome": outcome,
                "seconds": round(seconds, 4),
                "critic": self.critic.backend.name,
                "mode": self.critic.mode,
                "verdicts": [
                    {
                        "principle": v.principle,
                        "violated": v.violated,
                        "severity": v.severity,
                        "confidence": round(v.confidence, 4),
                        "critique": v.critique,
                        "suggestion": v.suggestion,
                        "parse_error": v.parse_error,
                        "raw": v.raw[:500] if v.parse_error else "",
                    }
                    for v in verdicts
                ],
            }
        )
