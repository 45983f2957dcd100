"""Work beside scoring: a bounded queue drained by a few asyncio workers.

Critiques and debates share the same promises: ``offer()`` never blocks (a full queue drops the
event and counts it), so a slow or dead backend can never delay scoring or a stream's HALT; a
worker outlives any exception one event raises (counted, logged); ``start``/``stop`` bracket the
workers' lives. Subclasses say what handling one event means (``handle``) and which metrics a
drop, the queue depth and a failure update (the ``on_*`` hooks).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Generic, TypeVar

__all__ = ["BoundedWorkers"]

E = TypeVar("E")


class BoundedWorkers(Generic[E]):
    """``concurrency`` tasks taking events from a queue of at most ``max_queue``."""

    def __init__(self, *, max_queue: int, concurrency: int, log: logging.Logger) -> None:
        if max_queue < 1 or concurrency < 1:
            raise ValueError(f"max_queue and concurrency: expected >= 1, got {max_queue} and {concurrency}")
        self.max_queue = max_queue
        self.concurrency = concurrency
        self._log = log
        self._queue: asyncio.Queue[E] | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.dropped = 0  # refused by a full queue
        self.done = 0  # taken from the queue and handled (successfully or not)
        self.failed = 0  # whose handling raised (logged; the worker went on)
        self.max_depth_seen = 0

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.max_queue)
        self._workers = [asyncio.create_task(self._work()) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        for w in self._workers:
            w.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def _enqueue(self, event: E) -> bool:
        """Queue ``event`` if the workers run and there is room; never blocks. True when queued."""
        if self._queue is None:
            return False
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            self.on_drop()
            return False
        self.max_depth_seen = max(self.max_depth_seen, self._queue.qsize())
        self.on_depth(self._queue.qsize())
        return True

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            event = await self._queue.get()
            self.on_depth(self._queue.qsize())
            try:
                await self.handle(event)
            except Exception as exc:  # a worker must outlive any one event (a bad reply, a full disk)
                self.failed += 1
                self._log.exception("%s failed; the worker goes on", self.describe(event))
                self.on_failure(exc)
            self.done += 1

    # -- what subclasses define -------------------------------------------------------------
    async def handle(self, event: E) -> None:
        raise NotImplementedError

    def describe(self, event: E) -> str:
        """How the log names one event."""
        return repr(event)[:200]

    def on_drop(self) -> None:
        """A full queue refused an event."""

    def on_depth(self, depth: int) -> None:
        """The queue now holds ``depth`` events."""

    def on_failure(self, exc: Exception) -> None:
        """Handling an event raised ``exc`` (already logged and counted in ``failed``)."""
