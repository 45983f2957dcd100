"""The audit log: one JSON line per finished generation (scores, fired detectors, text statistics).

Written by a background thread from a bounded queue, so scoring never waits for the disk; a full
queue drops the record and counts it. Operators grep it by ``request_id`` to see why an alert fired.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.pipeline import ScoreResult, StreamVerdict

log = logging.getLogger("monitor.audit")
_STOP = object()


def audit_record(rpc: str, result: ScoreResult | StreamVerdict) -> dict[str, Any]:
    """The JSON-able record of one finished generation."""
    halted = isinstance(result, StreamVerdict) and result.halt
    return {
        "time": round(time.time(), 3),
        "rpc": rpc,
        "request_id": result.request_id,
        "model": result.model,
        "flagged": any(d.fired for d in result.detectors),
        "halted": halted,
        "halt_reason": result.reason if isinstance(result, StreamVerdict) else "",
        "detectors": {
            d.name: {
                "score": round(d.score, 5),
                "probability": round(d.probability, 5),
                "fired": d.fired,
                "top_latents": [[c.latent, c.label] for c in d.top_features],
            }
            for d in result.detectors
        },
        "text_stats": {k: round(v, 4) for k, v in result.text_stats.items()},
        "change_points": list(result.change_points),
    }


class AuditLog:
    """Appends audit records to a JSONL file from a background thread.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "audit.jsonl"
    >>> a = AuditLog(path)
    >>> a.write({"request_id": "r1"}); a.close()
    >>> path.read_text()
    '{"request_id": "r1"}\\n'
    """

    def __init__(
        self, path: str | Path, max_queue: int = 10_000, on_result: Callable[[str], None] | None = None
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._queue: queue.Queue[Any] = queue.Queue(max_queue)
        self._on_result = on_result or (lambda result: None)
        self._thread = threading.Thread(target=self._run, name="audit-log", daemon=True)
        self._thread.start()

    def record(self, rpc: str, result: ScoreResult | StreamVerdict) -> None:
        """Queue the record of one finished generation (never blocks)."""
        self.write(audit_record(rpc, result))

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self._on_result("dropped")

    def _run(self) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            while True:
                item = self._queue.get()
                if item is _STOP:
                    return
                try:
                    f.write(json.dumps(item, ensure_ascii=False) + "\n")
                    if self._queue.empty():
                        f.flush()
                    self._on_result("written")
                except OSError as exc:  # a full disk loses records, never the sidecar
                    log.warning("audit_log: could not write to %s: %s", self.path, exc)
                    self._on_result("dropped")

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop."""
        self._queue.put(_STOP)
        self._thread.join(timeout)
