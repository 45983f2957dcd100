"""Start-up restore of the drift engine: saved state, else baseline file, else empty.

A corrupt saved state must not become a crash loop (under k8s a restart finds the same file): by
default it is moved aside to ``<file>.corrupt-<UTC time>``, logged and counted, and the sidecar
starts with a fresh reference. ``drift_state_strict`` refuses to start instead (one line, exit 2).
A baseline file is the operator's input, not state the sidecar wrote: a bad one always refuses.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from monitor.config import ServerConfig
from monitor.drift import DriftConfig, DriftMonitor, DriftStateError
from monitor.errors import ConfigError
from monitor.pipeline import DETECTOR_PREFIX

__all__ = ["RestoredDrift", "restore_drift"]

log = logging.getLogger("monitor.server")


@dataclass(frozen=True)
class RestoredDrift:
    """The drift engine to run with, and where a corrupt saved state was moved (None: none was)."""

    monitor: DriftMonitor
    moved_aside: Path | None = None


def restore_drift(config: ServerConfig, bundle_identity: str = "") -> RestoredDrift:
    """The drift engine for ``config``; raises ``ConfigError`` for what a restart cannot fix.

    Detector statistics belong to one bundle: a state saved under another bundle keeps its text
    statistics but starts fresh detector references (the old ones would raise false alarms).
    """
    dcfg = DriftConfig(reference_size=config.drift_reference_events, window_size=config.drift_window_events)
    mon: DriftMonitor | None = None
    moved: Path | None = None
    if config.drift_state:
        state = Path(config.drift_state)
        if state.exists() and not state.is_file():
            raise ConfigError(f"drift_state: expected a file path, got {state} (not a regular file)")
        if state.is_file():
            try:
                mon = DriftMonitor.load(state, dcfg)
            except OSError as exc:
                raise ConfigError(f"drift_state: cannot read {state}: {exc.strerror or exc}") from None
            except DriftStateError as exc:
                if config.drift_state_strict:
                    raise ConfigError(f"drift_state: {exc} (drift_state_strict: not moved aside)") from None
                moved = _move_aside(state, exc)
            else:
                log.info("drift: restored state from %s (%d events seen)", state, mon.events)
    if mon is None and config.drift_baseline:
        try:
            mon = DriftMonitor.load(config.drift_baseline, dcfg)
        except OSError as exc:
            raise ConfigError(f"drift_baseline: cannot read {config.drift_baseline}: {exc.strerror or exc}") from None
        except DriftStateError as exc:
            raise ConfigError(f"drift_baseline: {exc}") from None
        log.info("drift: reference from baseline %s (%d metrics)", config.drift_baseline, len(mon.metrics))
    if mon is None:
        mon = DriftMonitor(dcfg)
    if mon.bundle != bundle_identity:
        dropped = mon.forget(DETECTOR_PREFIX)
        if dropped:
            log.info(
                "drift: bundle changed (%s -> %s): %d detector statistics start fresh",
                mon.bundle or "none",
                bundle_identity,
                dropped,
            )
        mon.bundle = bundle_identity
    return RestoredDrift(mon, moved)


def _move_aside(state: Path, problem: DriftStateError) -> Path:
    """Rename the corrupt file out of the way (kept for a post-mortem) and say so in one line."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = state.with_name(f"{state.name}.corrupt-{stamp}")
    n = 1
    while target.exists():  # two restarts in the same second keep both files
        n += 1
        target = state.with_name(f"{state.name}.corrupt-{stamp}-{n}")
    try:
        os.replace(state, target)
    except OSError as exc:  # still start: the next save overwrites the corrupt file
        log.error(
            "drift_state: %s; could not move it aside (%s): starting with a fresh reference",
            problem,
            exc.strerror or exc,
        )
        return state
    log.error("drift_state: %s; moved aside to %s, starting with a fresh reference", problem, target)
    return target
