"""Drift engine on synthetic streams with known answers, and its distances against scipy."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from river import drift as river_drift
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr
from scipy.stats import ks_2samp, wasserstein_distance

from monitor.drift import DriftConfig, DriftMonitor, MetricDrift, js_distance, ks_statistic, psi, wasserstein
from monitor.drift._change import PageHinkley
from monitor.drift._distance import EPS, BinnedReference, quantile_edges, shares

ABRUPT_DELAY_BOUND = 30  # events after a 150 -> 400 token jump
RAMP_DELAY_BOUND = 600  # events into a 2000-event ramp from 150 to 400 tokens


def lengths(rng: np.random.Generator, mean: float, n: int) -> np.ndarray:
    """Response lengths in tokens: gamma-distributed (right-skewed, like real lengths), sd = mean / 3."""
    return rng.gamma(9.0, mean / 9.0, size=n)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distances_match_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a, b = lengths(rng, 150, 2000), lengths(rng, 180, 500)
    assert ks_statistic(a, b) == pytest.approx(ks_2samp(a, b).statistic, abs=1e-12)
    assert wasserstein(a, b) == pytest.approx(wasserstein_distance(a, b), rel=1e-9)
    edges = quantile_edges(a, 10)
    p, q = shares(a, edges), shares(b, edges)
    pc, qc = np.clip(p, EPS, None), np.clip(q, EPS, None)
    assert psi(a, b) == pytest.approx(float(np.sum(rel_entr(qc, pc) + rel_entr(pc, qc))), rel=1e-9)
    assert js_distance(a, b) == pytest.approx(float(jensenshannon(p, q, base=2)), rel=1e-9)
    # the bins really are reference deciles
    assert np.allclose(p, 0.1, atol=0.002)
    # the cached reference a scrape uses gives the same four numbers
    cached = BinnedReference.of(a).distances(b)
    assert cached == pytest.approx((psi(a, b), ks_statistic(a, b), js_distance(a, b), wasserstein(a, b)), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_page_hinkley_matches_river_up_to_its_first_detection(seed: int) -> None:
    """river's PageHinkley (alpha=1: no fading) finds the same first change, at the same event.

    Ours is kept hand-written because its state is plain JSON (persisted with the drift state) and
    it says which way the mean moved; after a detection river restarts on the next value and ours
    restarts at the detecting value, so only the first detection is compared.
    """
    rng = np.random.default_rng(seed)
    shift = float(rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 3.0))
    xs = np.concatenate([rng.normal(size=int(rng.integers(100, 400))), rng.normal(shift, 1.0, size=600)])
    ours = PageHinkley(delta=0.5, threshold=20.0, min_instances=30)
    theirs = river_drift.PageHinkley(min_instances=30, delta=0.5, threshold=20.0, alpha=1.0, mode="both")
    ours_at = theirs_at = None
    for i, x in enumerate(xs):
        ours.update(float(x))
        theirs.update(float(x))
        if ours_at is None and ours.drift_detected:
            ours_at = i
        if theirs_at is None and theirs.drift_detected:
            theirs_at = i
        if ours_at is not None and theirs_at is not None:
            break
    assert ours_at is not None and ours_at == theirs_at
    assert ours.direction == ("up" if shift > 0 else "down")


def test_length_shift_150_to_400_is_detected_quickly(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    m = MetricDrift("tokens", DriftConfig())
    for x in lengths(rng, 150, 2000 + 500):  # reference, then 500 stationary events
        assert not m.update(float(x))
    shifted = lengths(rng, 400, 500)
    delay = next(i for i, x in enumerate(shifted, 1) if m.update(float(x)))
    assert m.detector is not None and m.detector.direction == "up"
    psi_delay = None  # the window test needs enough shifted events in its 500-event window
    for i, x in enumerate(shifted[delay:], delay + 1):
        m.update(float(x))
        if psi_delay is None and i % 10 == 0 and m.reading().drifted:
            psi_delay = i
    reading = m.reading()
    print(
        f"abrupt 150 -> 400: change point after {delay} events, PSI alarm after {psi_delay}; "
        f"after 500: PSI {reading.psi:.2f} KS {reading.ks:.2f}"
    )
    assert delay <= ABRUPT_DELAY_BOUND
    assert psi_delay is not None and psi_delay <= 150
    assert reading.drifted and reading.psi > 1.0 and m.change_points == 1


def test_slow_ramp_150_to_400_is_detected_early_in_the_ramp(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(1)
    m = MetricDrift("tokens", DriftConfig())
    for x in lengths(rng, 150, 2500):
        m.update(float(x))
    ramp = np.linspace(150, 400, 2000)
    delay = next((i for i, mu in enumerate(ramp, 1) if m.update(float(rng.gamma(9.0, mu / 9.0)))), None)
    assert delay is not None, "a 150 -> 400 ramp was never detected"
    print(f"ramp 150 -> 400 over 2000 events: change point after {delay} events (mean then {ramp[delay - 1]:.0f})")
    assert delay <= RAMP_DELAY_BOUND


def test_stationary_streams_raise_no_alarm(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(2)
    streams = {
        "tokens": lambda n: lengths(rng, 150, n),
        "hedge_rate": lambda n: rng.exponential(1.5, n),
        "agreement_opener": lambda n: (rng.random(n) < 0.05).astype(float),
        "bullets": lambda n: rng.poisson(2.0, n).astype(float),
    }
    n_events = 10_000
    mon = DriftMonitor(DriftConfig())
    for name, draw in streams.items():
        mon.set_reference({name: draw(2000)})
    values = {name: draw(n_events) for name, draw in streams.items()}
    change_points = 0
    psi_alarms = 0
    checks = 0
    for i in range(n_events):
        change_points += len(mon.update({k: float(v[i]) for k, v in values.items()}))
        if i % 100 == 99:
            checks += 1
            psi_alarms += sum(r.drifted for r in mon.readings())
    rate = change_points / (n_events * len(streams))
    print(
        f"stationary: {n_events} events x {len(streams)} statistics: {change_points} change points "
        f"(false-alarm rate {rate:.2e} per event), {psi_alarms} PSI alarms in {checks * len(streams)} checks"
    )
    assert change_points == 0 and psi_alarms == 0


def test_state_round_trips_through_disk(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mon = DriftMonitor(DriftConfig(reference_size=300, window_size=200))
    for x in np.r_[lengths(rng, 150, 600), lengths(rng, 300, 100)]:
        mon.update({"tokens": float(x), "hedge_rate": float(x) / 100})
    loaded = DriftMonitor.load(mon.save(tmp_path / "drift.json"), mon.config)
    for a, b in zip(mon.readings(), loaded.readings(), strict=True):
        assert (a.metric, a.reference_events, a.window_events, a.change_points) == (
            b.metric,
            b.reference_events,
            b.window_events,
            b.change_points,
        )
        assert a.psi == pytest.approx(b.psi, rel=1e-4) and a.ks == pytest.approx(b.ks, abs=1e-3)
    # the loaded detector continues where the saved one stopped
    assert loaded.metrics["tokens"].detector == mon.metrics["tokens"].detector
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": 99, "metrics": {}}')
    with pytest.raises(ValueError, match="version: expected 1, got 99"):
        DriftMonitor.load(bad)


def test_a_failed_save_keeps_the_old_state_and_leaves_no_temp_file(tmp_path: Path) -> None:
    mon = DriftMonitor(DriftConfig(reference_size=10, window_size=10))
    mon.update({"tokens": 1.0})
    path = mon.save(tmp_path / "drift.json")
    before = path.read_bytes()
    mon.update({"tokens": 2.0})
    tmp = tmp_path / "drift.json.tmp"
    tmp.symlink_to("/dev/full")  # a real ENOSPC from the kernel on write
    with pytest.raises(OSError, match="No space left on device"):
        mon.save(path)
    assert path.read_bytes() == before
    assert not tmp.exists() and not tmp.is_symlink()


def _state(**metric: object) -> str:
    good = {"reference": [1.0, 2.0], "reference_frozen": True, "window": [1.5], "detector": None, "change_points": 0}
    return json.dumps({"version": 1, "events": 3, "bundle": "b", "metrics": {"tokens": {**good, **metric}}})


CORRUPT_STATES = {
    "truncated": (_state()[:40], "expected a JSON object, got unreadable JSON"),
    "empty": ("", "expected a JSON object, got unreadable JSON"),
    "garbage": ("\x00\xff garbage", "expected a JSON object, got unreadable JSON"),
    "nested too deep": ("[" * 100_000, "expected a JSON object, got unreadable JSON"),
    "a list": ("[]", "expected a JSON object, got a JSON array []"),
    "null": ("null", "expected a JSON object, got null"),
    "no version": ('{"metrics": {}}', "version: expected 1, got None"),
    "no metrics": ('{"version": 1, "events": 0}', "metrics: Field required"),
    "metrics a list": ('{"version": 1, "metrics": []}', "metrics: expected a valid dictionary"),
    "events a string": ('{"version": 1, "events": "7", "metrics": {}}', "events: expected a valid integer, got '7'"),
    "negative events": ('{"version": 1, "events": -1, "metrics": {}}', "events: expected greater than or equal to 0"),
    "reference a string": (_state(reference="abc"), "metrics.tokens.reference: expected a valid list, got 'abc'"),
    "reference of strings": (_state(reference=[1, "2"]), "metrics.tokens.reference.1: expected a valid number"),
    "reference NaN": (_state(reference=[float("nan")]), "metrics.tokens.reference.0: expected a finite number"),
    "frozen a string": (_state(reference_frozen="yes"), "metrics.tokens.reference_frozen: expected a valid boolean"),
    "frozen and empty": (_state(reference=[]), "reference: expected values when reference_frozen is true"),
    "window missing": (_state(window=None), "metrics.tokens.window: expected a valid list, got None"),
    "detector a list": (_state(detector=[1]), "metrics.tokens.detector: expected a valid dictionary"),
    "detector half": (_state(detector={"n": 3}), "metrics.tokens.detector.delta: Field required"),
    "change_points float": (_state(change_points=1.5), "metrics.tokens.change_points: expected a valid integer"),
}


@pytest.mark.parametrize("name", list(CORRUPT_STATES))
def test_a_corrupt_state_is_refused_naming_the_field(tmp_path: Path, name: str) -> None:
    text, message = CORRUPT_STATES[name]
    path = tmp_path / "drift.json"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        DriftMonitor.load(path)
    assert str(info.value).startswith(f"drift state {path}: ") and "\n" not in str(info.value)
    assert len(str(info.value)) < 400


def test_a_valid_state_with_a_detector_loads_every_field(tmp_path: Path) -> None:
    ph = PageHinkley()
    for x in [0.0] * 40:
        ph.update(x)
    path = tmp_path / "drift.json"
    path.write_text(_state(detector=ph.state(), change_points=2))
    m = DriftMonitor.load(path).metrics["tokens"]
    assert (m.reference, list(m.window), m.detector, m.change_points) == ([1.0, 2.0], [1.5], ph, 2)
