"""Withholding (``hold_back_tokens = N``, opt-in): what a streaming output classifier does.

Without it the client sees each token the step it is generated, and a HALT stops a request whose
flagged text the client already has (``finish_reason: content_filter`` then means "stopped").
With it, the scheduler side keeps a generated token from the client until a sidecar verdict
without HALT covers it, or until N newer tokens exist (so the delay is bounded by N tokens even
when the sidecar is slow). A HALT drops what was held: the client never sees the flagged tokens.
A request's last tokens are released only with its final verdict (the last generated token is
never read by any method, so no verdict covers it; the final one is the last word).

It runs in the engine-core process, on the outputs ``Scheduler.update_from_output`` returns
(``_patches.install_withholding``), before they are sent to the API server: tokens held are
taken out of ``EngineCoreOutput.new_token_ids`` and released in a later step's output; a finish
waits (the request's blocks are held meanwhile, so the engine keeps stepping) until the worker
reports the last verdict. What the worker reports (``WorkerReport.covered`` / ``done``) comes from
``SidecarStreams``' ``on_progress``. A request whose verdicts can never come (unmonitored: the
sidecar down, its stream failed) is released at once and passes through: withholding fails open,
and the request is counted unmonitored as always. Requests with per-token fields (logprobs, a
sampling mask, routed experts) pass through untouched (those are aligned with each output's
tokens), as do resumable (streaming-input) sessions, whose turns finish without the request
ending. With ``halt`` off the sidecar's advice is only recorded: nothing held is dropped.

Not bounded in time: a request's last tokens wait for its final verdict, which queues behind its
other chunks (each bounded by ``send_timeout``). An engine-side abort (``pause_generation(mode=
"abort")``, shutdown) drops what was held, as a client's disconnect does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from monitor.integrations.vllm._metadata import WorkerReport
from monitor.integrations.vllm._settings import HALT_STOP_REASON

# One-time fields of an output that is not sent: they go with the request's next output.
_CARRIED = (
    "prefill_stats",
    "events",
    "trace_headers",
    "num_nans_in_logits",
    "new_prompt_logprobs_tensors",
    "prompt_token_id_logprobs",
)
# Per-token fields aligned with ``new_token_ids``: a request that has them passes through untouched.
_ALIGNED = ("new_logprobs", "new_sampling_mask", "routed_experts")


@dataclass
class _Held:
    tokens: list[int] = field(default_factory=list)  # generated, not yet shown to the client
    released: int = 0
    covered: int = -1  # output tokens a verdict without HALT covers
    halted: str | None = None
    done: bool = False  # the last verdict came (or never will)
    passthrough: bool = False
    client: int = 0
    final: Any = None  # the finishing EngineCoreOutput, waiting for the last verdict
    carry: dict[str, Any] = field(default_factory=dict)  # one-time fields of outputs not sent


class Withholding:
    """Per-request held tokens on the scheduler side (keyed by the engine's request id)."""

    def __init__(self, hold_back: int, drop_on_halt: bool = True) -> None:
        if hold_back < 1:
            raise ValueError(f"hold_back_tokens: expected >= 1 to withhold, got {hold_back}")
        self.hold_back = hold_back
        self.drop_on_halt = drop_on_halt  # False with ``halt`` off: advice only, the request runs on
        self.exempt: set[str] = set()  # resumable sessions, marked before they are tracked
        self.held: dict[str, _Held] = {}
        self.tokens_withheld = 0  # tokens never shown because of a HALT, not yet in the stats

    def track(self, req_id: str) -> None:
        if req_id in self.exempt:
            self.exempt.discard(req_id)
            return
        self.held.setdefault(req_id, _Held())

    def forget(self, req_id: str) -> None:
        """The request was aborted: its held tokens go nowhere."""
        self.held.pop(req_id, None)

    def on_report(self, report: WorkerReport) -> None:
        for req_id, reason in report.halted.items() if self.drop_on_halt else ():
            st = self.held.get(req_id)
            if st is not None and st.halted is None:
                st.halted = reason
        for req_id, n in report.covered.items():
            st = self.held.get(req_id)
            if st is not None:
                st.covered = max(st.covered, n)
        for req_id in report.done:
            st = self.held.get(req_id)
            if st is not None:
                st.done = True

    def apply(self, outputs: dict[int, Any]) -> dict[int, Any]:
        """Take held tokens out of this step's outputs and put released ones in (in place)."""
        from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs

        seen: set[str] = set()
        for client, eco in outputs.items():
            kept = []
            for out in eco.outputs:
                st = self.held.get(out.request_id)
                if st is None or st.passthrough:
                    if st is not None and out.finish_reason is not None:
                        del self.held[out.request_id]
                    kept.append(out)
                    continue
                seen.add(out.request_id)
                st.client = client
                if self._take(out, st):
                    kept.append(out)
            eco.outputs = kept
        extra: dict[int, list[Any]] = {}
        for req_id, st in list(self.held.items()):
            if req_id in seen:
                continue
            if st.final is not None and (st.done or st.halted is not None):
                extra.setdefault(st.client, []).append(self._finish(req_id, st, st.final))
            elif not st.passthrough and (n := self._releasable(st)) > 0:
                out = EngineCoreOutput(request_id=req_id, new_token_ids=[])
                self._release(out, st, n)
                extra.setdefault(st.client, []).append(out)
        for client, outs in extra.items():
            if client in outputs:
                outputs[client].outputs.extend(outs)
            else:
                outputs[client] = EngineCoreOutputs(outputs=outs)
        self._count(outputs)
        return outputs

    def _count(self, outputs: dict[int, Any]) -> None:
        """Add the tokens withheld to this step's connector stats (built before ``apply`` ran: a
        count left for the next step would wait for traffic when this one is the engine's last)."""
        if not self.tokens_withheld:
            return
        for eco in outputs.values():
            stats = eco.scheduler_stats
            if stats is not None:
                data = stats.kv_connector_stats if stats.kv_connector_stats is not None else {}
                data["tokens_withheld"] = data.get("tokens_withheld", 0) + self.tokens_withheld
                stats.kv_connector_stats = data
                self.tokens_withheld = 0
                return

    @property
    def live(self) -> int:
        return len(self.held)

    # -- one request ------------------------------------------------------------------------------
    def _take(self, out: Any, st: _Held) -> bool:
        """Whether ``out`` is sent this step (its tokens replaced by the released ones)."""
        if st.released == 0 and not st.tokens and any(getattr(out, f) is not None for f in _ALIGNED):
            self.held.pop(out.request_id, None)  # aligned with each output's tokens: leave it alone
            return True
        st.tokens.extend(out.new_token_ids)
        out.new_token_ids = []
        if out.finish_reason is not None:
            if st.done or st.halted is not None or out.stop_reason == HALT_STOP_REASON:
                self._finish(out.request_id, st, out)
                return True
            st.final = out  # sent once the last verdict came
            return False
        n = self._releasable(st)
        if n > 0:
            self._release(out, st, n)
            return True
        for name in _CARRIED:  # not sent this step: its one-time fields go with the next output
            value = getattr(out, name)
            if value is not None and (value or name != "num_nans_in_logits"):
                st.carry[name] = (st.carry.get(name) or []) + value if name == "events" else value
        return False

    def _releasable(self, st: _Held) -> int:
        if st.halted is not None:
            return 0
        if st.done:
            return len(st.tokens)  # unmonitored (fails open), or the final verdict came
        generated = st.released + len(st.tokens)
        return max(0, min(len(st.tokens), max(generated - self.hold_back, st.covered) - st.released))

    def _release(self, out: Any, st: _Held, n: int) -> None:
        out.new_token_ids = st.tokens[:n]
        del st.tokens[:n]
        st.released += n
        _put_carried(out, st)
        if st.done and st.final is None and not st.tokens:
            st.passthrough = True  # nothing more to wait for (it may still be generating)

    def _finish(self, req_id: str, st: _Held, out: Any) -> Any:
        """The request's finishing output: the held tokens, or none of them after a HALT."""
        from vllm.v1.engine import FinishReason

        self.held.pop(req_id, None)
        if st.halted is not None or out.stop_reason == HALT_STOP_REASON:
            self.tokens_withheld += len(st.tokens)
            out.new_token_ids = []
            out.finish_reason, out.stop_reason = FinishReason.STOP, HALT_STOP_REASON  # content_filter
        else:
            out.new_token_ids = list(st.tokens)
        _put_carried(out, st)
        return out


def _put_carried(out: Any, st: _Held) -> None:
    """The carried one-time fields onto ``out``: earlier events first; its own values win."""
    for name, value in st.carry.items():
        own = getattr(out, name)
        if name == "events":
            setattr(out, name, value + (own or []))
        elif own is None or (name == "num_nans_in_logits" and not own):
            setattr(out, name, value)
    st.carry = {}
