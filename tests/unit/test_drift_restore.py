"""Start-up restore of the drift state: a corrupt file is moved aside for a fresh reference (or,
strict, refused in one line); a bad baseline or a drift_state that is a folder is always refused."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from monitor.config import ServerConfig
from monitor.drift import DriftConfig, DriftMonitor
from monitor.errors import ConfigError
from monitor.server._drift_restore import restore_drift

CORRUPT = '{"version": 1, "metrics": {"tokens": {"reference": "abc", "reference_frozen": true, "window": []}}}'


def saved_monitor(path: Path, value: float = 5.0) -> DriftMonitor:
    mon = DriftMonitor(DriftConfig(reference_size=3, window_size=3))
    for _ in range(4):
        mon.update({"tokens": value})
    mon.save(path)
    return mon


def test_a_corrupt_state_is_moved_aside_and_the_sidecar_starts_fresh(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    state.write_text(CORRUPT)
    restored = restore_drift(ServerConfig(drift_state=str(state)), "bundle-id")
    assert restored.monitor.metrics == {} and restored.monitor.events == 0
    assert restored.monitor.bundle == "bundle-id"
    moved = restored.moved_aside
    assert moved is not None and re.fullmatch(r"drift\.json\.corrupt-\d{8}T\d{6}Z", moved.name)
    assert moved.read_text() == CORRUPT and not state.exists()
    # the next corruption in the same second keeps both files
    state.write_text("{")
    again = restore_drift(ServerConfig(drift_state=str(state)))
    assert again.moved_aside is not None and again.moved_aside.read_text() == "{"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([moved.name, again.moved_aside.name])


def test_a_corrupt_state_falls_back_to_the_baseline(tmp_path: Path) -> None:
    state, baseline = tmp_path / "drift.json", tmp_path / "baseline.json"
    saved_monitor(baseline, 7.0)
    state.write_text("null")
    restored = restore_drift(ServerConfig(drift_state=str(state), drift_baseline=str(baseline)))
    assert restored.moved_aside is not None
    assert restored.monitor.metrics["tokens"].reference == [7.0, 7.0, 7.0]


def test_strict_refuses_a_corrupt_state_in_one_line_and_leaves_it(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    state.write_text(CORRUPT)
    with pytest.raises(ConfigError) as info:
        restore_drift(ServerConfig(drift_state=str(state), drift_state_strict=True))
    assert str(info.value) == (
        f"drift_state: drift state {state}: metrics.tokens.reference: expected a valid list, got 'abc' "
        "(drift_state_strict: not moved aside)"
    )
    assert state.read_text() == CORRUPT


def test_a_bad_baseline_is_refused_naming_the_field(tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.json"
    baseline.write_text("[]")
    with pytest.raises(ConfigError, match=r"^drift_baseline: drift state .*: expected a JSON object, got a JSON array"):
        restore_drift(ServerConfig(drift_baseline=str(baseline)))
    assert baseline.read_text() == "[]"  # the operator's file is never moved


def test_a_drift_state_that_is_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"drift_state: expected a file path, got .* \(not a regular file\)"):
        restore_drift(ServerConfig(drift_state=str(tmp_path)))


def test_a_good_state_is_restored(tmp_path: Path) -> None:
    state = tmp_path / "drift.json"
    saved = saved_monitor(state)
    restored = restore_drift(ServerConfig(drift_state=str(state), drift_reference_events=3, drift_window_events=3))
    assert restored.moved_aside is None
    assert restored.monitor.events == saved.events == 4
    assert restored.monitor.metrics["tokens"].window == saved.metrics["tokens"].window
