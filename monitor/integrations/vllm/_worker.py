"""The worker side of the connector: gather the planned rows, hand them to the streams, report HALTs.

After each step (``wait_for_save``, once the pseudo-draft wrote the step's rows into the
cache-only KV layer) this side gathers, in one indexing op for the whole batch, the rows the
scheduler side planned, projects them through the bundle's encoder slice on the device when
asked, and hands them to ``SidecarStreams`` (a background thread: the step never waits for the
network). On a GPU the device-to-host copy is asynchronous: a side stream copies into pinned host
memory and records an event; the rows are handed over at a later step once the event has
completed (or, for a request that finishes, after waiting for it), as vLLM's own hidden-states
connector does. Every map is keyed by the engine's request id; the client's id is what the
sidecar's audit record shows.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from monitor.integrations.vllm._metadata import ReadSpan, StepMetadata, WorkerReport
from monitor.integrations.vllm._settings import AdapterSettings, external_id
from monitor.integrations.vllm._stats import MonitorStats
from monitor.integrations.vllm._streams import SidecarStreams

log = logging.getLogger("vllm.safety_monitor")

Rows = dict[str, dict[str, np.ndarray]]  # engine request id -> hook point -> [rows, width]


@dataclass
class _Copy:
    """One step's rows on their way to the host: ready once ``event`` has completed."""

    host: list[torch.Tensor]  # per hook point [n, width], float32 (pinned on a GPU); widths may differ
    spans: list[tuple[str, int, bool]]  # (engine request id, rows, first row is the decision row)
    event: Any = None  # torch.cuda.Event, None when the copy was synchronous

    def ready(self) -> bool:
        return self.event is None or bool(self.event.query())


class MonitorWorker:
    """Gathers each step's rows from the hidden-state cache and streams them per request."""

    def __init__(self, settings: AdapterSettings, block_size: int) -> None:
        self.settings = settings
        self.block_size = block_size
        self.kv: torch.Tensor | None = None
        self.streams: SidecarStreams | None = None
        self.slices: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._blocks: dict[str, list[int]] = {}
        self._prompt_len: dict[str, int] = {}
        self._pending: deque[_Copy] = deque()
        self._side_stream: Any = None
        self._report_lock = threading.Lock()  # the streams' thread reports; the step takes
        self._report = WorkerReport()
        self._reported_done: set[str] = set()  # done, and the scheduler was told (withholding)
        self._sent_final: set[str] = set()
        self._reported: dict[str, Any] = {}

    # -- per step --------------------------------------------------------------------------------
    def after_step(self, meta: StepMetadata) -> None:
        """Open new requests, track blocks, gather this step's rows, finish ended requests."""
        streams = self.streams
        if streams is None:
            return
        for req_id, prompt in meta.opened.items():
            self._prompt_len[req_id] = len(prompt)
            streams.open(req_id, prompt, wire_id=external_id(req_id), traceparent=meta.traces.get(req_id, ""))
        for req_id, blocks in meta.blocks.items():
            if req_id in meta.replaced:
                self._blocks[req_id] = list(blocks)
            else:
                self._blocks.setdefault(req_id, []).extend(blocks)
        if meta.reads:
            self._pending.append(self._gather(meta.reads))
        self._flush(wait=bool(meta.finished))
        for req_id, tokens in meta.finished.items():
            self._blocks.pop(req_id, None)
            self._prompt_len.pop(req_id, None)
            streams.finish(req_id, tokens)
            self._sent_final.add(req_id)

    def _flush(self, wait: bool) -> None:
        """Hand completed copies to the streams, oldest first (``wait``: all of them, blocking)."""
        assert self.streams is not None
        while self._pending and (wait or self._pending[0].ready()):
            copy = self._pending.popleft()
            if copy.event is not None:
                copy.event.synchronize()
            self.streams.push(*self._split(copy))

    def _gather(self, reads: list[ReadSpan]) -> _Copy:
        """One index op for the whole batch: slot = block[p // bs] * bs + p % bs."""
        assert self.kv is not None
        bs = self.block_size
        slots: list[int] = []
        spans: list[tuple[str, int, bool]] = []
        for r in reads:
            blocks = self._blocks.get(r.req_id, ())
            n = 0
            for p in range(r.start, r.end):
                b = p // bs
                if b >= len(blocks):
                    break
                slots.append(blocks[b] * bs + p % bs)
                n += 1
            spans.append((r.req_id, n, r.start == self._prompt_len.get(r.req_id, 0) - 1))
        device = self.kv.device
        cuda = device.type == "cuda"
        # The index from a pinned host tensor: no synchronous host-to-device copy on the step.
        idx = torch.tensor(slots, dtype=torch.long, pin_memory=cuda).to(device, non_blocking=cuda)
        gathered = self.kv[idx // bs, :, idx % bs]  # [n, hook points, d_model]
        slices = self.slices  # read once per step: the streams' thread sets it when the catalog comes
        # Per hook point: each has its own encoder slice, so the projected widths differ.
        if slices is not None:
            rows = [gathered[:, j, :].to(torch.float32) @ w + b for j, (w, b) in enumerate(slices)]
        else:
            rows = [gathered[:, j, :].to(torch.float32) for j in range(gathered.shape[1])]
        if not cuda:
            return _Copy(rows, spans)
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream(device=device)
        host = [torch.empty(r.shape, dtype=torch.float32, pin_memory=True) for r in rows]
        side = self._side_stream
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for pinned, part in zip(host, rows, strict=True):
                part.record_stream(side)
                pinned.copy_(part, non_blocking=True)
            event = torch.cuda.Event()
            event.record(side)
        return _Copy(host, spans, event)

    def _split(self, copy: _Copy) -> tuple[Rows, Rows]:
        """``(rows, decisions)`` per request: a span that starts at the decision position
        (``prompt_len - 1``) gives that row apart."""
        arrs = [h.numpy() for h in copy.host]
        hooks = self.settings.hook_points
        out: Rows = {}
        decisions: Rows = {}
        at = 0
        for req_id, n, has_decision in copy.spans:
            first = at
            if n and has_decision:
                decisions[req_id] = {hp: arrs[j][at : at + 1] for j, hp in enumerate(hooks)}
                first += 1
            if at + n > first:
                out[req_id] = {hp: arrs[j][first : at + n] for j, hp in enumerate(hooks)}
            at += n
        return out, decisions

    # -- HALT and finished requests --------------------------------------------------------------
    def on_halt(self, req_id: str, reason: str) -> None:
        """Called by the streams' thread with the engine request id the sidecar advised to halt."""
        with self._report_lock:
            self._report.halted[req_id] = reason

    def on_progress(self, req_id: str, covered: int, done: bool) -> None:
        """Called by the streams' thread (withholding only): a verdict without HALT covers
        ``covered`` output tokens; ``done``: the request's last verdict came, or never will."""
        with self._report_lock:
            if covered >= 0:
                self._report.covered[req_id] = max(covered, self._report.covered.get(req_id, -1))
            if done:
                self._report.done.add(req_id)

    def take_report(self) -> WorkerReport | None:
        """What the scheduler side must learn this step (None when nothing happened)."""
        with self._report_lock:
            if not self._report:
                return None
            report, self._report = self._report, WorkerReport()
        # a second "done" for a request already released (its stream ended early, then its
        # final item came) would stay here forever: keep only requests this side still holds
        report.done &= self._prompt_len.keys() | self._sent_final
        self._reported_done |= report.done
        return report if report else None

    def take_sent_final(self) -> set[str] | None:
        """Requests whose blocks may be freed: their final chunk was handed to the streams and,
        when withholding, the scheduler already knows their last verdict came (so it releases or
        drops the held tokens before the engine may go idle)."""
        if not self._sent_final:
            return None
        if self.settings.hold_back_tokens > 0:
            done = self._sent_final & self._reported_done
            self._sent_final -= done
            self._reported_done -= done
        else:
            done, self._sent_final = self._sent_final, set()
        return done or None

    @property
    def live(self) -> int:
        """Requests and copies this side still holds (0 once every request has ended)."""
        return (
            len(self._blocks)
            + len(self._prompt_len)
            + len(self._pending)
            + len(self._sent_final)
            + len(self._reported_done)
        )

    # -- counters --------------------------------------------------------------------------------
    def take_stats(self) -> MonitorStats | None:
        """What changed in the streams' counters since the last call, as vLLM connector stats."""
        if self.streams is None:
            return None
        now = _counts(self.streams)
        stats = MonitorStats()
        for key, value in now.items():
            before = self._reported.get(key, 0 if not isinstance(value, dict) else {})
            if isinstance(value, dict):
                for reason, n in value.items():
                    stats.add(key, n - before.get(reason, 0), reason)
            else:
                stats.add(key, value - before)
        self._reported = now
        return None if stats.is_empty() else stats


def _counts(streams: SidecarStreams) -> dict[str, Any]:
    """The streams' cumulative counters under the stats' names."""
    st = streams.stats
    unmonitored = dict(getattr(st, "unmonitored", {}) or {}) or ({"stream_failed": st.failed} if st.failed else {})
    dropped = dict(getattr(st, "dropped", {}) or {}) or ({"queue_full": st.rows_dropped} if st.rows_dropped else {})
    return {
        "requests_opened": st.requests,
        "requests_monitored": st.finished,
        "rows_sent": st.rows_sent,
        "halts": st.halts,
        "requests_unmonitored": unmonitored,
        "rows_dropped": dropped,
    }
