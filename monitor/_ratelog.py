"""Log a rejection once per cause per interval, so a hostile client cannot flood the log."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Hashable


class RateLimitedLog:
    """``warning(key, msg, *args)`` logs at most once per ``interval`` s per key, with a count of
    the messages suppressed since the last one it logged.

    >>> import logging
    >>> r = RateLimitedLog(logging.getLogger("doctest"), interval=60)
    >>> [r.warning("k", "bad") for _ in range(3)]
    [True, False, False]
    >>> r.suppressed("k")
    2
    """

    def __init__(self, logger: logging.Logger, interval: float = 60.0, max_keys: int = 1024) -> None:
        self._log = logger
        self._interval = interval
        self._max_keys = max_keys
        self._last: dict[Hashable, float] = {}
        self._skipped: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    def warning(self, key: Hashable, msg: str, *args: object) -> bool:
        """Log unless ``key`` was logged less than ``interval`` s ago; True when it logged."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self._interval:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return False
            if key not in self._last and len(self._last) >= self._max_keys:
                self._last.clear()  # bounded memory: forget old causes rather than grow
                self._skipped.clear()
            skipped = self._skipped.pop(key, 0)
            self._last[key] = now
        suffix = f" ({skipped} more like this in the last {self._interval:g} s)" if skipped else ""
        self._log.warning(msg + suffix, *args)
        return True

    def suppressed(self, key: Hashable) -> int:
        """Messages for ``key`` not logged since the last one that was."""
        with self._lock:
            return self._skipped.get(key, 0)
