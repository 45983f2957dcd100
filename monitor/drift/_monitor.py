"""Drift of many statistics against a reference: windows, distances, change points, persistence.

``MetricDrift`` is one statistic: a reference sample (from a baseline file, or the first
``reference_size`` events after start), a sliding current window, and a Page-Hinkley detector on
values standardised by the reference. ``DriftMonitor`` holds one per metric name, is thread-safe,
and saves/loads its whole state as JSON, so a restart keeps the baseline. Memory is bounded:
``reference_size + window_size`` floats per metric.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import threading
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.drift._change import PageHinkley
from monitor.drift._distance import BinnedReference
from monitor.drift._state import STATE_VERSION, parse_state

TESTS = ("psi", "ks", "js", "wasserstein")


@dataclass(frozen=True)
class DriftConfig:
    """Sensitivity and memory of the drift engine (defaults are what the tests measure).

    psi_alarm: PSI at or above which a metric counts as drifted (0.25 is the usual "significant").
    min_window: current-window events needed before distances are reported.
    delta / threshold: Page-Hinkley tolerance and alarm level, in reference standard deviations.
    """

    reference_size: int = 2000
    window_size: int = 500
    min_window: int = 100
    bins: int = 10
    psi_alarm: float = 0.25
    delta: float = 0.5
    threshold: float = 50.0
    min_instances: int = 30


@dataclass
class DriftReading:
    """One metric's drift now."""

    metric: str
    reference_events: int
    window_events: int
    psi: float
    ks: float
    js: float
    wasserstein: float
    drifted: bool
    change_points: int


@dataclass
class MetricDrift:
    """One statistic: reference sample, current window, change detector.

    >>> m = MetricDrift("tokens", DriftConfig(reference_size=200, window_size=100))
    >>> for i in range(300):
    ...     _ = m.update(150.0 + (i % 7))
    >>> m.reference_ready, m.reading().psi < 0.01, m.reading().drifted
    (True, True, False)
    """

    name: str
    config: DriftConfig = field(default_factory=DriftConfig)
    reference: list[float] = field(default_factory=list)
    reference_frozen: bool = False
    window: deque[float] = field(default_factory=deque)
    detector: PageHinkley | None = None
    change_points: int = 0
    _scale: tuple[float, float] | None = None
    _binned: BinnedReference | None = None  # cached once the reference is frozen

    def __post_init__(self) -> None:
        self.window = deque(self.window, maxlen=self.config.window_size)

    @property
    def reference_ready(self) -> bool:
        return self.reference_frozen

    def set_reference(self, values: Iterable[float]) -> None:
        """Use ``values`` (a baseline) as the reference; a uniform sample is kept if there are too many."""
        vals = [float(v) for v in values if math.isfinite(v)]
        if len(vals) > self.config.reference_size:
            vals = random.Random(0).sample(vals, self.config.reference_size)
        self.reference = vals
        self.reference_frozen = bool(vals)
        self._scale = None
        self._binned = None
        self.detector = None

    def update(self, x: float) -> bool:
        """Fold in one value; True when it completed a change point."""
        if not math.isfinite(x):
            return False
        if not self.reference_frozen:
            self.reference.append(x)
            if len(self.reference) >= self.config.reference_size:
                self.reference_frozen = True
            return False
        self.window.append(x)
        mean, sd = self.scale
        if self.detector is None:
            c = self.config
            self.detector = PageHinkley(c.delta, c.threshold, c.min_instances)
        self.detector.update((x - mean) / sd)
        if self.detector.drift_detected:
            self.change_points += 1
            return True
        return False

    @property
    def scale(self) -> tuple[float, float]:
        """Reference mean and spread used to standardise values (spread floored so a constant works)."""
        if self._scale is None:
            ref = np.asarray(self.reference, dtype=np.float64)
            mean = float(ref.mean()) if len(ref) else 0.0
            sd = float(ref.std()) if len(ref) else 0.0
            self._scale = (mean, max(sd, 0.1 * max(abs(mean), 1.0)))
        return self._scale

    def reading(self) -> DriftReading:
        """Distances of the current window from the reference (zeros until both are big enough)."""
        return self.snapshot().reading()

    def snapshot(self) -> _Snapshot:
        """A copy of what ``reading`` needs (cheap), so the distances can be computed off the lock."""
        if self.reference_frozen and self._binned is None:
            self._binned = BinnedReference.of(np.asarray(self.reference, dtype=np.float64), self.config.bins)
        return _Snapshot(
            self.name,
            self.config,
            len(self.reference),
            self._binned if self.reference_frozen else None,
            np.asarray(self.window, dtype=np.float64),
            self.change_points,
        )

    def copy(self) -> MetricDrift:
        """An independent copy (samples, detector state) for saving off the lock."""
        m = MetricDrift(self.name, self.config, list(self.reference), self.reference_frozen, deque(self.window))
        m.detector = PageHinkley.from_state(self.detector.state()) if self.detector else None
        m.change_points = self.change_points
        return m

    def state(self) -> dict[str, Any]:
        return {
            "reference": [float(f"{v:.6g}") for v in self.reference],
            "reference_frozen": self.reference_frozen,
            "window": [float(f"{v:.6g}") for v in self.window],
            "detector": self.detector.state() if self.detector else None,
            "change_points": self.change_points,
        }

    @classmethod
    def from_state(cls, name: str, config: DriftConfig, s: Mapping[str, Any]) -> MetricDrift:
        m = cls(name, config, list(s["reference"]), bool(s["reference_frozen"]), deque(s["window"]))
        m.detector = PageHinkley.from_state(s["detector"]) if s.get("detector") else None
        m.change_points = int(s.get("change_points", 0))
        return m


@dataclass(frozen=True)
class _Snapshot:
    """One metric's samples at an instant: the drift distances are computed from this, unlocked."""

    name: str
    config: DriftConfig
    reference_events: int
    binned: BinnedReference | None  # None until the reference is frozen
    cur: np.ndarray
    change_points: int

    def reading(self) -> DriftReading:
        ready = self.binned is not None and len(self.cur) >= self.config.min_window
        p, ks, js, w = self.binned.distances(self.cur) if ready and self.binned is not None else (0.0,) * 4
        return DriftReading(
            metric=self.name,
            reference_events=self.reference_events,
            window_events=len(self.cur),
            psi=p,
            ks=ks,
            js=js,
            wasserstein=w,
            drifted=ready and p >= self.config.psi_alarm,
            change_points=self.change_points,
        )


class DriftMonitor:
    """Drift of every metric the sidecar tracks; ``update(values)`` per event, ``readings()`` to export."""

    def __init__(self, config: DriftConfig | None = None) -> None:
        self.config = config or DriftConfig()
        self.metrics: dict[str, MetricDrift] = {}
        self.events = 0
        self.bundle = ""  # identity of the detector bundle whose verdicts the detector metrics hold
        self._lock = threading.Lock()

    def update(self, values: Mapping[str, float]) -> list[str]:
        """Fold in one event's values; returns the metrics that completed a change point."""
        changed = []
        with self._lock:
            self.events += 1
            for name, x in values.items():
                m = self.metrics.get(name)
                if m is None:
                    m = self.metrics[name] = MetricDrift(name, self.config)
                if m.update(float(x)):
                    changed.append(name)
        return changed

    def readings(self) -> list[DriftReading]:
        """Every metric's distances. Only the copy is taken under the lock that ``update`` needs;
        the distances (~ms per scrape) are computed after, so a scrape never stalls scoring."""
        with self._lock:
            snaps = [m.snapshot() for m in self.metrics.values()]
        return [s.reading() for s in snaps]

    def direction(self, name: str) -> str:
        """Direction ('up'/'down') of the last change point of ``name``."""
        with self._lock:
            d = self.metrics[name].detector
            return d.direction if d else ""

    def forget(self, prefix: str) -> int:
        """Drop every metric whose name starts with ``prefix`` (they restart from live traffic)."""
        with self._lock:
            names = [n for n in self.metrics if n.startswith(prefix)]
            for n in names:
                del self.metrics[n]
        return len(names)

    def set_reference(self, samples: Mapping[str, Iterable[float]]) -> None:
        """Install a baseline: a reference sample per metric."""
        with self._lock:
            for name, values in samples.items():
                m = self.metrics.setdefault(name, MetricDrift(name, self.config))
                m.set_reference(values)

    # -- persistence ----------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the whole state as JSON, atomically (a crash never leaves half a file)."""
        path = Path(path)
        with self._lock:  # copies only: the JSON is built after the lock is released
            events = self.events
            copies = {n: m.copy() for n, m in self.metrics.items()}
        doc = {
            "version": STATE_VERSION,
            "events": events,
            "bundle": self.bundle,
            "metrics": {n: m.state() for n, m in copies.items()},
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        try:
            tmp.write_text(json.dumps(doc))
            os.replace(tmp, path)
        except BaseException:  # a full disk: the last whole state stays, no half-written file beside it
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path, config: DriftConfig | None = None) -> DriftMonitor:
        """Read a state (or baseline) file written by ``save``, every field checked first.

        Raises ``DriftStateError`` (a ``ValueError``) naming the bad field; ``OSError`` when the
        file cannot be read.
        """
        doc = parse_state(Path(path))
        mon = cls(config)
        mon.events = doc.events
        mon.bundle = doc.bundle
        for name, s in doc.metrics.items():
            mon.metrics[name] = MetricDrift.from_state(name, mon.config, s.model_dump())
        return mon

    def baseline(self) -> DriftMonitor:
        """A copy holding only the references (what ``monitor baseline`` writes)."""
        out = DriftMonitor(self.config)
        with self._lock:
            for name, m in self.metrics.items():
                out.metrics[name] = MetricDrift(name, self.config, list(m.reference), True)
        return out
