"""The audit log: one JSON line per finished generation (scores, fired detectors, text statistics),
per HALT when it is decided, and per drift change point.

Acknowledged means durable: ``record`` returns a future that completes once the line is written
and flushed to the operating system (and fsync'ed when ``fsync=True``); the servicer awaits it
before it sends the reply that acknowledges the generation, so a sidecar killed with SIGKILL
never loses a record it acknowledged. A background thread writes in group commits (everything
queued, one write + flush), so a burst costs one flush, not one per record. Files rotate by size
and age. Operators grep it by ``request_id`` to see why an alert fired.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from monitor._jsonl import jsonl_line
from monitor._ratelog import RateLimitedLog
from monitor.detectors import DetectorResult
from monitor.pipeline import ScoreResult, StreamVerdict

__all__ = ["AuditLog", "AuditUnavailable", "audit_record", "change_point_record", "halt_record"]

log = logging.getLogger("monitor.audit")
_STOP = object()


class AuditUnavailable(Exception):
    """The record could not be made durable (queue full or disk error): do not acknowledge."""


def _num(x: float, digits: int) -> float | None:
    """JSON has no NaN/Infinity: a non-finite value is written as null."""
    return round(x, digits) if math.isfinite(x) else None


def audit_record(rpc: str, result: ScoreResult | StreamVerdict) -> dict[str, Any]:
    """The JSON-able record of one finished generation.

    Drift change points are not in it: drift counts a generation only once this record is durable,
    so they follow in a ``change_point_record`` of their own.
    """
    halted = isinstance(result, StreamVerdict) and result.halt
    return {
        "time": round(time.time(), 3),
        "rpc": rpc,
        "request_id": result.request_id,
        "model": result.model,
        "flagged": any(d.fired for d in result.detectors),
        "halted": halted,
        "halt_reason": result.reason if isinstance(result, StreamVerdict) else "",
        "detectors": _detectors(result.detectors),
        "text_stats": {k: _num(v, 4) for k, v in result.text_stats.items()},
    }


def halt_record(rpc: str, verdict: StreamVerdict) -> dict[str, Any]:
    """The record of a HALT, written when it is decided: the stream may never send its final chunk."""
    return {
        "type": "halt",
        "time": round(time.time(), 3),
        "rpc": rpc,
        "request_id": verdict.request_id,
        "model": verdict.model,
        "chunk_index": verdict.chunk_index,
        "tokens_seen": verdict.tokens_seen,
        "halted": True,
        "halt_reason": verdict.reason,
        "detectors": _detectors(verdict.detectors),
    }


def change_point_record(rpc: str, request_id: str, change_points: tuple[str, ...]) -> dict[str, Any]:
    """The drift change points that one acknowledged generation completed."""
    return {
        "type": "change_point",
        "time": round(time.time(), 3),
        "rpc": rpc,
        "request_id": request_id,
        "change_points": list(change_points),
    }


def _detectors(results: tuple[DetectorResult, ...]) -> dict[str, Any]:
    return {
        d.name: {
            "score": _num(d.score, 5),
            "probability": _num(d.probability, 5),
            "fired": d.fired,
            "top_latents": [[c.latent, c.label] for c in d.top_features],
        }
        for d in results
    }


class AuditLog:
    """Appends audit records to a JSONL file from a background thread, in group commits.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> a = AuditLog(path)
    >>> a.write({"request_id": "r1"}).result(5)
    >>> a.close()
    >>> path.read_text()
    '{"request_id": "r1"}\\n'
    """

    def __init__(
        self,
        path: str | Path,
        max_queue: int = 10_000,
        on_result: Callable[[str], None] | None = None,
        *,
        fsync: bool = False,
        max_bytes: int = 256 * 1024 * 1024,
        backups: int = 5,
        max_age_seconds: float = 0.0,
        warn_interval: float = 60.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self.max_bytes = max_bytes
        self.backups = backups
        self.max_age_seconds = max_age_seconds
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._on_result = on_result or (lambda result: None)
        self._file: Any = None
        self._opened_at = 0.0
        # a full disk fails every group commit: one warning per cause per interval, with a count
        self._warn = RateLimitedLog(log, interval=warn_interval)
        # Opened here, not on the first record: a path that cannot be appended to (a folder, an
        # unwritable or missing directory) raises OSError to the caller at start-up.
        self._open_for(0)
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def record(self, rpc: str, result: ScoreResult | StreamVerdict) -> Future[None]:
        """Queue the record of one finished generation; the future completes once it is durable."""
        return self.write(audit_record(rpc, result))

    def write(self, record: dict[str, Any]) -> Future[None]:
        """Queue any JSON-able record (never blocks); a full queue fails the future at once."""
        done: Future[None] = Future()
        try:
            self._queue.put_nowait((record, done))
        except queue.Full:
            self._on_result("dropped")
            done.set_exception(AuditUnavailable(f"audit_log: queue full ({self._queue.maxsize} records waiting)"))
        return done

    # -- writer thread --------------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:  # group commit: everything queued now goes in one write + flush
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            items = []
            for item in batch:
                if item is _STOP:
                    stopping = True
                else:
                    items.append(item)
            if items:
                self._commit(items)
        if self._file is not None:
            self._file.close()

    def _commit(self, items: list[tuple[dict[str, Any], Future[None]]]) -> None:
        lines, ok = [], []
        for record, done in items:  # a record that is not JSON fails alone, not its group commit
            try:
                lines.append(jsonl_line(record, allow_nan=False, default=str))
            except (TypeError, ValueError) as exc:
                self._warn.warning(
                    "not-json", "audit_log: record %s is not JSON-able: %s", str(record.get("request_id"))[:128], exc
                )
                self._on_result("dropped")
                done.set_exception(AuditUnavailable(f"audit_log: record not JSON-able: {exc}"))
            else:
                ok.append((record, done))
        items = ok
        if not items:
            return
        data = "".join(lines).encode("utf-8")
        try:
            f = self._open_for(len(data))
            f.write(data)
            f.flush()
            if self.fsync:
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk loses records, never the sidecar (nor floods its log)
            self._warn.warning(
                ("write", exc.errno), "audit_log: could not write to %s: %s", self.path, exc.strerror or exc
            )
            self._close_file()
            for _, done in items:
                self._on_result("dropped")
                done.set_exception(AuditUnavailable(f"audit_log: cannot write {self.path}: {exc}"))
            return
        for _, done in items:
            self._on_result("written")
            done.set_result(None)

    def _open_for(self, incoming: int) -> Any:
        """The open file, rotated first when it is too big or too old."""
        if self._file is not None:
            size = self._file.tell()
            too_big = self.max_bytes > 0 and size > 0 and size + incoming > self.max_bytes
            too_old = self.max_age_seconds > 0 and time.time() - self._opened_at >= self.max_age_seconds
            if too_big or too_old:
                self._close_file()
                self._rotate()
        if self._file is None:
            self._file = self.path.open("ab")
            self._opened_at = time.time()
            self._repair_torn_line()
        return self._file

    def _repair_torn_line(self) -> None:
        """A process killed mid-write can leave half a line: end it so the next record stays whole."""
        f = self._file
        if f.tell() == 0:
            return
        with self.path.open("rb") as r:
            r.seek(-1, os.SEEK_END)
            if r.read(1) != b"\n":
                f.write(b"\n")

    def _rotate(self) -> None:
        if self.backups <= 0:
            self.path.unlink(missing_ok=True)
            return
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.path.exists():
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def _close_file(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
