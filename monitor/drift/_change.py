"""Online change detection for slow or sudden mean shifts (river-style: ``update(x)``, then read).

Page-Hinkley, two-sided: it accumulates how far each value sits above (and below) the running
mean, less a tolerance ``delta``; a change is declared when the accumulated excess since its
minimum passes ``threshold``. Values should be in units of the reference's spread (the drift
monitor standardises them), so ``delta`` and ``threshold`` read as standard deviations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class PageHinkley:
    """Two-sided Page-Hinkley test; after a detection it restarts from the new level.

    >>> ph = PageHinkley()
    >>> for x in [0.0] * 100 + [5.0] * 30:
    ...     ph.update(x)
    ...     if ph.drift_detected:
    ...         break
    >>> ph.n_detections, ph.direction
    (1, 'up')
    """

    delta: float = 0.5
    threshold: float = 50.0
    min_instances: int = 30
    n: int = 0
    mean: float = 0.0
    up: float = 0.0
    up_min: float = 0.0
    down: float = 0.0
    down_max: float = 0.0
    n_detections: int = 0
    drift_detected: bool = False
    direction: str = ""

    def update(self, x: float) -> None:
        """Fold in one value; ``drift_detected`` tells whether it completed a change."""
        self.drift_detected = False
        self.n += 1
        self.mean += (x - self.mean) / self.n
        self.up += x - self.mean - self.delta
        self.up_min = min(self.up_min, self.up)
        self.down += x - self.mean + self.delta
        self.down_max = max(self.down_max, self.down)
        if self.n < self.min_instances:
            return
        if self.up - self.up_min > self.threshold:
            self._detected("up", x)
        elif self.down_max - self.down > self.threshold:
            self._detected("down", x)

    def _detected(self, direction: str, x: float) -> None:
        self.drift_detected = True
        self.direction = direction
        self.n_detections += 1
        # restart at the new level, so one shift is one detection
        self.n, self.mean, self.up, self.up_min, self.down, self.down_max = 1, x, 0.0, 0.0, 0.0, 0.0

    def state(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> PageHinkley:
        return cls(**state)
