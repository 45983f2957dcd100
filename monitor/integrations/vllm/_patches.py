"""Every change the adapter makes to vLLM internals, in one place, each behind a version gate.

vLLM has no public hook for what the adapter needs in four places: stopping a request the sidecar
halted (the scheduler's ``check_stop``), showing that stop as ``finish_reason: "content_filter"``
(the output processor), dropping ``extract_hidden_states``' pseudo-draft on CPU (its proposer),
and filling in the engine config when ``SAFETY_MONITOR_SIDECAR`` is set (``EngineArgs``). Each
patch here:

- runs only on a vLLM version listed in ``SUPPORTED`` (the ones it was read against and tested on);
- is installed inside ``guarded``: an exception is logged once and reported, never raised into vLLM
  (vLLM calls plugins without a try/except: an error there would stop the server);
- is proven to take effect by ``self_test`` at start-up (a rebinding that no longer matches the
  scheduler would otherwise make HALT silently never happen). A failed patch or self-test turns
  monitoring off for that engine, logged and counted (``vllm:safety_monitor_modes_refused_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from monitor.integrations.vllm._settings import HALT_STOP_REASON

log = logging.getLogger("vllm.safety_monitor")

SUPPORTED = ("0.32",)  # vLLM major.minor versions the patches were read against and tested on
CONTENT_FILTER = "content_filter"
_MARK = "_safety_monitor"


def version_problem() -> str | None:
    """None when the installed vLLM is a supported version; else why not (one line)."""
    try:
        import vllm

        version = str(vllm.__version__)
    except Exception as exc:  # its import failing is reported, never raised
        return f"vLLM could not be imported ({type(exc).__name__}: {exc})"
    if ".".join(version.split(".")[:2]) not in SUPPORTED:
        return f"vLLM {version} is not a supported version ({', '.join(SUPPORTED)}.x); monitoring is OFF"
    return None


def guarded(name: str, install: Callable[[], Any]) -> str | None:
    """Run ``install``; None on success, else a one-line reason (logged, never raised)."""
    problem = version_problem()
    if problem is None:
        try:
            install()
            return None
        except Exception as exc:  # a patch must never take vLLM down
            problem = f"patch {name} failed: {type(exc).__name__}: {exc}"
    log.error("safety monitor: %s; monitoring is OFF", problem)
    return problem


# -- the scheduler's outputs (withholding) ------------------------------------------------------


def install_withholding(vllm_config: Any) -> None:
    """Wrap ``Scheduler.update_from_output`` once: its outputs pass through the connector's
    ``Withholding`` (when the engine's connector has one) before they leave the engine core."""
    from vllm.v1.core.sched.scheduler import Scheduler

    original = Scheduler.update_from_output
    if not getattr(original, _MARK, False):

        def update_from_output(self: Any, *args: Any, **kwargs: Any) -> Any:
            outputs = original(self, *args, **kwargs)
            monitor = getattr(getattr(self, "connector", None), "scheduler", None)
            withholding = getattr(monitor, "withholding", None)
            return withholding.apply(outputs) if withholding is not None else outputs

        setattr(update_from_output, _MARK, True)
        Scheduler.update_from_output = update_from_output
    used = vllm_config.scheduler_config.get_scheduler_cls()
    if not getattr(getattr(used, "update_from_output", None), _MARK, False):
        raise RuntimeError(
            f"update_from_output: the engine's scheduler {used.__qualname__} overrides it; "
            "outputs would not be withheld"
        )


def check_withholding_takes_effect() -> None:
    """Run ``Withholding`` on vLLM's own output types: a token newer than the bound is held, and
    a HALT drops what was held and finishes as ``content_filter`` (raises ``RuntimeError``)."""
    from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason

    from monitor.integrations.vllm._metadata import WorkerReport
    from monitor.integrations.vllm._withhold import Withholding

    w = Withholding(2)
    w.track("self-test")
    step = {0: EngineCoreOutputs(outputs=[EngineCoreOutput(request_id="self-test", new_token_ids=[1, 2, 3])])}
    sent = [o.new_token_ids for o in w.apply(step)[0].outputs]
    w.on_report(WorkerReport(halted={"self-test": "self-test"}))
    last = EngineCoreOutput(request_id="self-test", new_token_ids=[4], finish_reason=FinishReason.LENGTH)
    out = w.apply({0: EngineCoreOutputs(outputs=[last])})[0].outputs
    if sent != [[1]] or len(out) != 1 or out[0].new_token_ids or out[0].stop_reason != HALT_STOP_REASON:
        raise RuntimeError(f"update_from_output: withholding does not work on vLLM's output types ({sent}, {out})")


# -- the scheduler's stop check (HALT) ---------------------------------------------------------

_halt_marks: dict[str, str] | None = None


def install_halt_check(marks: dict[str, str]) -> None:
    """Wrap the scheduler's stop check once: a request in ``marks`` stops at its next token with
    ``stop_reason = HALT_STOP_REASON``."""
    global _halt_marks
    from vllm.v1.core.sched import scheduler as sched_mod
    from vllm.v1.request import RequestStatus

    _halt_marks = marks
    original = sched_mod.check_stop
    if getattr(original, _MARK, False):
        return

    def check_stop(request: Any, max_model_len: int) -> bool:
        if original(request, max_model_len):
            return True
        ref = _halt_marks
        if ref is not None and request.request_id in ref:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = HALT_STOP_REASON
            return True
        return False

    setattr(check_stop, _MARK, True)
    sched_mod.check_stop = check_stop


def check_halt_takes_effect() -> None:
    """Run the scheduler's own token-append-and-stop method on a stand-in request that is marked:
    it must stop with the HALT reason (raises ``RuntimeError`` naming what no longer matches)."""
    from vllm.v1.core.sched.scheduler import Scheduler

    marks = _halt_marks
    if marks is None:
        raise RuntimeError("check_stop: the halt check is not installed")
    rid = "safety-monitor-self-test"
    req = stand_in_request(rid)
    marks[rid] = "self-test"
    try:
        _, stopped = Scheduler._update_request_with_output(SimpleNamespace(max_model_len=1 << 20), req, [7])
    finally:
        marks.pop(rid, None)
    if not stopped or req.stop_reason != HALT_STOP_REASON:
        raise RuntimeError(
            "check_stop: the scheduler no longer stops a halted request through the patched check "
            "(Scheduler._update_request_with_output does not call vllm.v1.core.sched.scheduler.check_stop)"
        )


def stand_in_request(request_id: str) -> Any:
    """What ``check_stop`` reads of a request, for a generation that would go on (no stop token,
    no length limit): only a halt mark can stop it."""
    out: list[int] = []
    return SimpleNamespace(
        request_id=request_id,
        pooling_params=None,
        sampling_params=SimpleNamespace(
            eos_token_id=None, stop_token_ids=None, min_tokens=0, repetition_detection=None
        ),
        output_token_ids=out,
        append_output_token_ids=out.append,
        num_tokens=2,
        num_output_tokens=1,
        max_tokens=1 << 20,
        status=None,
        stop_reason=None,
    )


# -- the pseudo-draft of extract_hidden_states (model runner V1) --------------------------------


def drop_pseudo_drafts() -> None:
    """Keep ``extract_hidden_states``' capture, drop its pseudo-draft token (model runner V1).

    The method's proposer caches the step's hidden states and then proposes the sampled token
    again as a one-token "draft", which the next step verifies (and nearly always rejects): every
    decode step computes two positions per request instead of one. On a GPU that position is
    almost free; on a CPU, where the forward is compute-bound, it cost a third of the throughput
    (measured: docs/vllm.md). Returning no drafts (the shape ngram uses when it has no proposal)
    keeps the capture and schedules one position per request. Model runner V2 has another class
    (``ExtractHiddenStatesSpeculator``) whose drafts stay: the planner skips speculative positions
    either way, so this changes cost, never which rows are read.
    """
    from vllm.v1.spec_decode.extract_hidden_states import ExtractHiddenStatesProposer

    original = ExtractHiddenStatesProposer.propose
    if getattr(original, _MARK, False):
        return

    def propose(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafts = original(self, *args, **kwargs)  # caches the hidden states
        return [[] for _ in range(int(drafts.shape[0]))]

    setattr(propose, _MARK, True)
    ExtractHiddenStatesProposer.propose = propose


# -- the API server: a halted request's finish reason -----------------------------------------


def map_halt_to_content_filter() -> None:
    """A request the sidecar halted (``stop_reason == HALT_STOP_REASON``) finishes with
    ``finish_reason: "content_filter"``, as OpenAI's API names output withheld by a filter."""
    from vllm.v1.engine import output_processor

    state_cls = output_processor.RequestState
    original = state_cls._new_completion_output
    if getattr(original, _MARK, False):
        return

    def _new_completion_output(self: Any, token_ids: Any, finish_reason: Any, stop_reason: Any) -> Any:
        out = original(self, token_ids, finish_reason, stop_reason)
        if stop_reason == HALT_STOP_REASON and out.finish_reason is not None:
            out.finish_reason = CONTENT_FILTER
        return out

    setattr(_new_completion_output, _MARK, True)
    state_cls._new_completion_output = _new_completion_output


def check_content_filter_takes_effect() -> None:
    """The output processor's method is ours and maps the HALT reason (raises ``RuntimeError``)."""
    from vllm.v1.engine import output_processor

    if not getattr(output_processor.RequestState._new_completion_output, _MARK, False):
        raise RuntimeError("content_filter: RequestState._new_completion_output is not the patched method")


# -- the engine config ------------------------------------------------------------------------


def wrap_create_engine_config(before: Callable[[Any], None], after: Callable[[Any], None]) -> None:
    """``EngineArgs.create_engine_config`` calls ``before(engine_args)`` and ``after(vllm_config)``."""
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, _MARK, False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        before(self)
        vllm_config = original(self, *args, **kwargs)
        after(vllm_config)
        return vllm_config

    setattr(create_engine_config, _MARK, True)
    EngineArgs.create_engine_config = create_engine_config


def register_connector(name: str, module: str, cls: str) -> None:
    """Register the connector by name (``kv_connector: SafetyMonitorConnector`` in configs)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    try:
        KVConnectorFactory.register_connector(name, module, cls)
    except ValueError as exc:  # registered already in this process (vLLM calls plugins repeatedly)
        if "already registered" not in str(exc):
            raise
