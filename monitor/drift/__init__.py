"""Drift detection: reference vs current windows (PSI, KS, Jensen-Shannon, Wasserstein) and
Page-Hinkley change points, per statistic, bounded in memory and persisted across restarts."""

from monitor.drift._change import PageHinkley
from monitor.drift._distance import js_distance, ks_statistic, psi, wasserstein
from monitor.drift._monitor import TESTS, DriftConfig, DriftMonitor, DriftReading, MetricDrift
from monitor.drift._state import DriftStateError

__all__ = [
    "TESTS",
    "DriftConfig",
    "DriftMonitor",
    "DriftReading",
    "DriftStateError",
    "MetricDrift",
    "PageHinkley",
    "js_distance",
    "ks_statistic",
    "psi",
    "wasserstein",
]
