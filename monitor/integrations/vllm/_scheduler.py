"""The scheduler side of the connector: which positions' rows are final at each step.

The scheduler process knows every request's progress; the worker holds the rows. Each step this
side plans, per request, the span of positions whose rows became final in the step being
scheduled, and hands the plan to the worker in ``StepMetadata``.

Timeline under vLLM 0.32's **sync** scheduling (the only mode the adapter reads rows in; see
``refused_mode``): step ``s`` is scheduled after step ``s - 1``'s output was processed, so a
request's ``num_computed_tokens`` counts only tokens whose inputs were real (accepted) tokens.
The step computes ``num_scheduled_tokens`` positions from there, the last ``len(spec)`` of them
speculative (``extract_hidden_states``' pseudo-draft). After the step, positions
``[computed, computed + n_sched - len(spec))`` hold final rows; the speculative ones are read once
accepted (they then count as computed at a later step) and recomputed when rejected.

Under **async** scheduling step ``s + 1`` is scheduled before step ``s``'s output exists: its
``num_computed_tokens`` already counts step ``s``'s speculative slot as if accepted, and the
rejection is subtracted only later. The span above would then include the pseudo-draft's row
(computed from a guessed token) from about the third decode step on. Until a planner for that
timeline is verified on a GPU, the adapter refuses async scheduling: the plugin turns it off
(logged, counted), and a connector that finds it on anyway reads nothing (``refused_mode``).

Request ids: everything here is keyed by the engine's request id, unique per request even when
two clients send the same id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from monitor.integrations.vllm._metadata import ReadSpan, StepMetadata, WorkerReport
from monitor.integrations.vllm._withhold import Withholding

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput


def refused_mode(vllm_config: Any) -> str | None:
    """Why the adapter must not read rows under this engine config (None: it may)."""
    if getattr(vllm_config.scheduler_config, "async_scheduling", False):
        return "async_scheduling"
    return None


class MonitorScheduler:
    """Plans each step's reads; holds HALT marks for the stop check (``_patches.install_halt_check``)."""

    def __init__(self, group: int) -> None:
        self.group = group  # index of the KV-cache group holding the hidden-state blocks
        # set by the connector once the output patch took effect (``_patches.install_withholding``)
        self.withholding: Withholding | None = None
        self.next_read: dict[str, int] = {}  # live request -> first position not yet read
        self.halt_marks: dict[str, str] = {}  # live request -> reason; read by the stop check
        self.halts_applied = 0
        self._finished: dict[str, list[int]] = {}
        self._traces: dict[str, str] = {}  # allocated, not yet opened -> traceparent

    def note_trace(self, req_id: str, headers: Mapping[str, str] | None) -> None:
        """Keep a new request's ``traceparent`` (vLLM's ``Request.trace_headers``: the OpenAI
        server's incoming trace headers) until it is opened: its stream carries it to the sidecar."""
        value = (headers or {}).get("traceparent")
        if value and req_id not in self.next_read:
            self._traces[req_id] = str(value)[:512]

    def build_meta(self, so: SchedulerOutput) -> StepMetadata:
        meta = StepMetadata(finished=self._finished)
        self._finished = {}
        spec = so.scheduled_spec_decode_tokens
        n_sched = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            meta.blocks[new.req_id] = list(new.block_ids[self.group])
            meta.replaced.add(new.req_id)
            if new.req_id not in self.next_read:
                # New. (Model runner V2 sends a preempted request back here when it resumes: it
                # keeps its stream and its read position, and only its blocks are replaced.)
                prompt = list(new.prompt_token_ids or ())
                meta.opened[new.req_id] = prompt
                trace = self._traces.pop(new.req_id, None)
                if trace:
                    meta.traces[new.req_id] = trace
                self.next_read[new.req_id] = max(len(prompt) - 1, 0)
                if self.withholding is not None:
                    self.withholding.track(new.req_id)
            self._plan(meta, new.req_id, new.num_computed_tokens, n_sched, spec)
        cached = so.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            if req_id not in self.next_read:
                continue
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                meta.blocks[req_id] = list(new_blocks[self.group])
                if req_id in cached.resumed_req_ids:
                    meta.replaced.add(req_id)
            self._plan(meta, req_id, cached.num_computed_tokens[i], n_sched, spec)
        return meta

    def _plan(
        self,
        meta: StepMetadata,
        req_id: str,
        computed: int,
        n_sched: Mapping[str, int],
        spec: Mapping[str, Sequence[int]],
    ) -> None:
        # Positions computed this step, minus speculative ones (read once accepted, later).
        end = computed + n_sched.get(req_id, 0) - len(spec.get(req_id, ()))
        start = self.next_read[req_id]
        if end > start:
            meta.reads.append(ReadSpan(req_id, start, end))
            self.next_read[req_id] = end

    def on_worker_report(self, report: WorkerReport) -> None:
        """HALT advice from the worker: mark live requests only (a halt decided on a request's
        final chunk arrives after it finished and must not stay behind); verdict progress goes
        to the withholding."""
        if self.withholding is not None:
            self.withholding.on_report(report)
        for req_id, reason in report.halted.items():
            if req_id in self.next_read and req_id not in self.halt_marks:
                self.halt_marks[req_id] = reason
                self.halts_applied += 1

    def finished(self, req_id: str, output_token_ids: Sequence[int]) -> bool:
        """A request ended (stopped, aborted, halted): forget it; tell the worker with its output.

        Returns whether the request was monitored (its blocks are then held until the worker has
        handed over the final chunk)."""
        monitored = self.next_read.pop(req_id, None) is not None
        self.halt_marks.pop(req_id, None)
        self._traces.pop(req_id, None)
        if monitored:
            self._finished[req_id] = list(output_token_ids)
        return monitored

    @property
    def live(self) -> int:
        """Requests this side tracks (for tests and stats: 0 once every request has ended)."""
        held = self.withholding.live if self.withholding is not None else 0
        return len(self.next_read) + len(self.halt_marks) + len(self._finished) + held
