"""The connector's two sides on vLLM's real scheduler-output types (runs in vLLM's environment).

Run by tests/integration/test_vllm_connector_units.py as ``.venv-vllm/bin/python -m pytest
tests/vllm``: the main environment has no vLLM. Step sequences are built by hand with vLLM's own
``SchedulerOutput`` / ``NewRequestData`` / ``CachedRequestData``; the hidden-state cache is a tensor
whose every slot holds its own (block, hook, offset) code, so a row read names where it came from.
The streams are a recorder of what the worker hands over (the network side is tested with a real
sidecar in tests/integration/test_vllm_streams.py and end to end in test_vllm.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput

from monitor.integrations.vllm import _patches
from monitor.integrations.vllm._metadata import WorkerReport
from monitor.integrations.vllm._scheduler import MonitorScheduler, refused_mode
from monitor.integrations.vllm._settings import HALT_STOP_REASON, AdapterSettings
from monitor.integrations.vllm._stats import MonitorPromMetrics, MonitorStats
from monitor.integrations.vllm._worker import MonitorWorker

BS = 4  # block size
HOOKS = ("blocks.1.hook_resid_post", "blocks.3.hook_resid_post")
WIDTH = 3


def new_req(rid: str, prompt: Sequence[int], blocks: list[int], computed: int = 0) -> NewRequestData:
    return NewRequestData(
        req_id=rid,
        prompt_token_ids=list(prompt),
        mm_features=[],
        sampling_params=None,
        pooling_params=None,
        block_ids=(list(blocks),),
        num_computed_tokens=computed,
        lora_request=None,
    )


def cached(reqs: Sequence[tuple[str, int, list[int] | None]], resumed: set[str] | None = None) -> CachedRequestData:
    """(request id, num_computed_tokens, new block ids or None) per scheduled running request."""
    return CachedRequestData(
        req_ids=[r for r, _, _ in reqs],
        resumed_req_ids=set(resumed or ()),
        new_token_ids=[[] for _ in reqs],
        all_token_ids={},
        new_block_ids=[None if b is None else (list(b),) for _, _, b in reqs],
        num_computed_tokens=[c for _, c, _ in reqs],
        num_output_tokens=[0 for _ in reqs],
    )


def step(
    new: Sequence[NewRequestData] = (),
    running: CachedRequestData | None = None,
    n_sched: dict[str, int] | None = None,
    spec: dict[str, list[int]] | None = None,
) -> SchedulerOutput:
    n_sched = dict(n_sched or {})
    return SchedulerOutput(
        scheduled_new_reqs=list(new),
        scheduled_cached_reqs=running or CachedRequestData.make_empty(),
        num_scheduled_tokens=n_sched,
        total_num_scheduled_tokens=sum(n_sched.values()),
        scheduled_spec_decode_tokens=dict(spec or {}),
        scheduled_encoder_inputs={},
        finished_req_ids=set(),
        free_encoder_mm_hashes=[],
    )


def code(block: int, hook: int, offset: int) -> float:
    return block * 100 + hook * 10 + offset


def position_code(blocks: Sequence[int], p: int, hook: int = 0) -> float:
    return code(blocks[p // BS], hook, p % BS)


class RecordingStreams:
    """What the worker hands to ``SidecarStreams``: opens, rows per request, decisions, finishes."""

    def __init__(self) -> None:
        self.opened: dict[str, str] = {}  # key -> wire id
        self.traces: dict[str, str] = {}  # key -> traceparent
        self.rows: dict[str, list[np.ndarray]] = {}
        self.decisions: dict[str, np.ndarray] = {}
        self.finished: dict[str, list[int]] = {}

    def open(
        self,
        request_id: str,
        prompt_ids: Sequence[int],
        labels: Any = None,
        wire_id: str | None = None,
        traceparent: str = "",
    ) -> None:
        assert request_id not in self.opened, f"{request_id} opened twice"
        self.opened[request_id] = wire_id or request_id
        if traceparent:
            self.traces[request_id] = traceparent

    def push(self, batch: dict[str, dict[str, np.ndarray]], decisions: dict[str, dict[str, np.ndarray]]) -> None:
        for rid, rows in batch.items():
            self.rows.setdefault(rid, []).append(rows[HOOKS[0]][:, 0].copy())
            assert np.array_equal(rows[HOOKS[1]][:, 0] - rows[HOOKS[0]][:, 0], np.full(len(rows[HOOKS[0]]), 10.0))
        for rid, rows in decisions.items():
            assert rid not in self.decisions, f"{rid}: a second decision row"
            self.decisions[rid] = rows[HOOKS[0]][:, 0].copy()

    def finish(self, request_id: str, token_ids: Sequence[int]) -> None:
        self.finished[request_id] = list(token_ids)

    def read(self, rid: str) -> list[float]:
        return [float(x) for part in self.rows.get(rid, []) for x in part]


@pytest.fixture
def sides() -> tuple[MonitorScheduler, MonitorWorker, RecordingStreams]:
    kv = torch.zeros(16, len(HOOKS), BS, WIDTH)
    for b in range(16):
        for h in range(len(HOOKS)):
            for o in range(BS):
                kv[b, h, o, :] = code(b, h, o)
    worker = MonitorWorker(AdapterSettings("127.0.0.1:1", hook_points=HOOKS, projected=False), BS)
    worker.kv = kv
    rec = RecordingStreams()
    worker.streams = rec  # type: ignore[assignment]
    return MonitorScheduler(group=0), worker, rec


def run(sched: MonitorScheduler, worker: MonitorWorker, so: SchedulerOutput) -> None:
    worker.after_step(sched.build_meta(so))


def test_sync_steps_read_the_decision_row_then_one_row_per_generated_token(sides: Any) -> None:
    """Prompt of 6 tokens in two chunks (chunked prefill), then decode steps: the decision row is
    position 5 (last prompt token), then positions 6, 7, 8 as their tokens go through the model."""
    sched, worker, rec = sides
    blocks = [3, 9, 11]
    run(sched, worker, step([new_req("r-aaaaaaaa", range(6), blocks[:2])], n_sched={"r-aaaaaaaa": 4}))
    assert rec.opened == {"r-aaaaaaaa": "r"} and not rec.decisions  # first chunk: nothing final yet
    run(sched, worker, step(running=cached([("r-aaaaaaaa", 4, None)]), n_sched={"r-aaaaaaaa": 2}))
    assert rec.decisions["r-aaaaaaaa"].tolist() == [position_code(blocks, 5)]
    for computed in (6, 7, 8):  # position 8 starts a third block, allocated on that step
        more = [11] if computed == 8 else None
        run(sched, worker, step(running=cached([("r-aaaaaaaa", computed, more)]), n_sched={"r-aaaaaaaa": 1}))
    assert rec.read("r-aaaaaaaa") == [position_code(blocks, p) for p in (6, 7, 8)]


def test_a_requests_traceparent_travels_to_its_own_stream_once(sides: Any) -> None:
    """vLLM's ``Request.trace_headers`` (the OpenAI server's incoming headers) -> the stream of
    that request only; a resumed request is not noted again; a finished one leaves nothing."""
    sched, worker, rec = sides
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    sched.note_trace("a-11111111", {"traceparent": tp, "tracestate": "x=1"})
    sched.note_trace("b-22222222", None)
    sched.note_trace("c-33333333", {"traceparent": tp})
    run(
        sched,
        worker,
        step(
            [new_req("a-11111111", range(4), [1]), new_req("b-22222222", range(4), [2])],
            n_sched={"a-11111111": 4, "b-22222222": 4},
        ),
    )
    assert rec.traces == {"a-11111111": tp}
    sched.note_trace("a-11111111", {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"})  # resumed: kept as is
    assert "a-11111111" not in sched._traces
    sched.finished("c-33333333", [])  # allocated, never opened (aborted): forgotten
    assert sched._traces == {}


def test_pseudo_draft_positions_are_read_only_once_accepted(sides: Any) -> None:
    """With extract_hidden_states' pseudo-draft (model runner V2, or a GPU): each decode step
    computes the real token and a draft slot; the draft's row is skipped, and read only when a
    later step counts it as computed (accepted), else recomputed and read then."""
    sched, worker, rec = sides
    blocks = [2, 5, 7]
    rid = "q-bbbbbbbb"
    run(sched, worker, step([new_req(rid, range(3), blocks)], n_sched={rid: 3}))
    # decode: position 3 real + position 4 a draft
    run(sched, worker, step(running=cached([(rid, 3, None)]), n_sched={rid: 2}, spec={rid: [11]}))
    assert rec.read(rid) == [position_code(blocks, 3)]
    # draft rejected: computed is 4, position 4 recomputed with the real token (and a new draft at 5)
    run(sched, worker, step(running=cached([(rid, 4, None)]), n_sched={rid: 2}, spec={rid: [12]}))
    # draft accepted: computed jumps to 6 and the step computes 6 (+ draft 7)
    run(sched, worker, step(running=cached([(rid, 6, None)]), n_sched={rid: 2}, spec={rid: [13]}))
    assert rec.read(rid) == [position_code(blocks, p) for p in (3, 4, 5, 6)]


def test_two_requests_with_the_same_client_id_stay_apart_and_halt_alone(sides: Any) -> None:
    """vLLM keeps two requests with one client id apart by a suffix: each is its own stream (the
    sidecar sees the client's id on both), its own rows, and a HALT stops only the one it names."""
    sched, worker, rec = sides
    a, b = "chatcmpl-same-0000000a", "chatcmpl-same-0000000b"
    run(sched, worker, step([new_req(a, range(4), [1]), new_req(b, range(4), [4])], n_sched={a: 4, b: 4}))
    run(sched, worker, step(running=cached([(a, 4, [6]), (b, 4, [8])]), n_sched={a: 1, b: 1}))
    assert rec.opened == {a: "chatcmpl-same", b: "chatcmpl-same"}
    assert rec.read(a) == [position_code([1, 6], 4)] and rec.read(b) == [position_code([4, 8], 4)]
    worker.on_halt(b, "harmful_compliance")
    report = worker.take_report()
    assert isinstance(report, WorkerReport) and report.halted == {b: "harmful_compliance"}
    sched.on_worker_report(report)
    assert sched.halt_marks == {b: "harmful_compliance"}
    assert worker.take_report() is None  # reported once


def test_preempted_request_resumes_without_a_second_stream_v1_and_v2(sides: Any) -> None:
    """Preemption frees the blocks; on resume the request recomputes from its prefix into new
    blocks. V1 sends it among the running requests (``resumed_req_ids``), model runner V2 among the
    new ones: either way it keeps its one stream and its decision row, reads only positions it
    had not read, from the new blocks."""
    sched, worker, rec = sides
    v1, v2 = "v1-0000000a", "v2-0000000b"
    run(sched, worker, step([new_req(v1, range(5), [1, 2]), new_req(v2, range(5), [3, 4])], n_sched={v1: 5, v2: 5}))
    run(sched, worker, step(running=cached([(v1, 5, None), (v2, 5, None)]), n_sched={v1: 1, v2: 1}))
    # both preempted (not scheduled), then resumed with new blocks and recomputed from scratch
    run(sched, worker, step(running=cached([(v1, 0, [10, 11])], resumed={v1}), n_sched={v1: 7}))
    run(sched, worker, step([new_req(v2, range(5), [12, 13], computed=0)], n_sched={v2: 7}))
    assert set(rec.opened) == {v1, v2}  # RecordingStreams.open refuses a second open
    assert rec.decisions[v1].tolist() == [position_code([1, 2], 4)]
    assert rec.decisions[v2].tolist() == [position_code([3, 4], 4)]
    assert rec.read(v1) == [position_code([1, 2], 5), position_code([10, 11], 6)]
    assert rec.read(v2) == [position_code([3, 4], 5), position_code([12, 13], 6)]


def test_finish_and_abort_leave_no_state_and_late_halts_are_not_kept(sides: Any) -> None:
    """200 requests that end early (aborted by the client) and one halted on its final chunk: the
    worker hands each final chunk over once, and neither side keeps anything afterwards."""
    sched, worker, rec = sides
    ids = [f"abort-{i}-{i:08x}" for i in range(200)]
    run(sched, worker, step([new_req(r, range(3), [i % 16]) for i, r in enumerate(ids)], n_sched=dict.fromkeys(ids, 3)))
    for r in ids:
        assert sched.finished(r, [5])
    meta = sched.build_meta(step())
    assert set(meta.finished) == set(ids)
    worker.after_step(meta)
    assert rec.finished == {r: [5] for r in ids}
    assert worker.take_sent_final() == set(ids) and worker.take_sent_final() is None
    sched.on_worker_report(WorkerReport({ids[0]: "late"}))  # decided on the final chunk, after the end
    assert sched.halt_marks == {} and sched.live == 0
    assert not sched.finished("never-opened-00000000", [])  # not ours: its blocks are not held
    assert worker.live == 0


def test_halt_check_stops_the_marked_request_through_the_schedulers_own_method() -> None:
    """The patched stop check, run through ``Scheduler._update_request_with_output`` (what the
    start-up self-test does): a marked request stops with the HALT reason; an unmarked one not."""
    marks: dict[str, str] = {}
    _patches.install_halt_check(marks)
    _patches.check_halt_takes_effect()
    from vllm.v1.core.sched.scheduler import Scheduler

    req = _patches.stand_in_request("other")
    _, stopped = Scheduler._update_request_with_output(SimpleNamespace(max_model_len=100), req, [3])
    assert not stopped and req.stop_reason is None
    marks["other"] = "harmful_compliance"
    _, stopped = Scheduler._update_request_with_output(SimpleNamespace(max_model_len=100), req, [4])
    assert stopped and req.stop_reason == HALT_STOP_REASON


def test_a_halt_check_the_scheduler_no_longer_calls_fails_the_self_test(monkeypatch: pytest.MonkeyPatch) -> None:
    """If a vLLM release stopped calling ``check_stop`` from the scheduler's module, HALT would
    silently never happen: the self-test catches it and ``guarded`` turns it into 'monitoring off'."""
    from vllm.v1.core.sched.scheduler import Scheduler

    def no_check(self: Any, request: Any, new_token_ids: list[int], is_stale: bool = False) -> Any:
        for t in new_token_ids:
            request.append_output_token_ids(t)
        return new_token_ids, False

    monkeypatch.setattr(Scheduler, "_update_request_with_output", no_check)
    marks: dict[str, str] = {}
    problem = _patches.guarded(
        "check_stop", lambda: (_patches.install_halt_check(marks), _patches.check_halt_takes_effect())
    )
    assert problem is not None and "no longer stops a halted request" in problem


def test_async_scheduling_would_read_the_pseudo_drafts_row_so_it_is_refused(sides: Any) -> None:
    """A synthetic async-scheduling sequence: step s+1 is scheduled before step s's output exists,
    so its num_computed_tokens already counts step s's pseudo-draft as accepted. The plan would then
    read the draft slot's row (computed from a guessed token) as a generated token's. That is why
    the adapter refuses async scheduling (``refused_mode``) instead of reading wrong rows."""
    sched, worker, rec = sides
    rid = "async-0000000a"
    blocks = [1, 2, 3]
    run(sched, worker, step([new_req(rid, range(3), blocks)], n_sched={rid: 3}))
    # step 1: real token at 3, draft at 4. Step 2 is scheduled before step 1's rejection is known:
    # computed = 5 (3 + both slots), and it computes 5 (+ draft 6).
    run(sched, worker, step(running=cached([(rid, 3, None)]), n_sched={rid: 2}, spec={rid: [9]}))
    run(sched, worker, step(running=cached([(rid, 5, None)]), n_sched={rid: 2}, spec={rid: [9]}))
    final = {3}  # position 4's row came from the rejected draft token: not final until recomputed
    read = [int(p) for p in range(3, 6) if position_code(blocks, p) in rec.read(rid)]
    assert 4 in read and 4 not in final  # the sync plan under async timing reads a draft's row
    assert refused_mode(SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=True))) == "async_scheduling"
    assert refused_mode(SimpleNamespace(scheduler_config=SimpleNamespace(async_scheduling=False))) is None


def test_stats_reach_prometheus_as_vllm_counters() -> None:
    """Worker and scheduler increments aggregate (vLLM sums them across workers) and land in
    ``vllm:safety_monitor_*_total`` counters, per engine and reason."""
    a, b = MonitorStats(), MonitorStats()
    a.add("requests_opened", 3)
    a.add("requests_monitored", 2)
    a.add("requests_unmonitored", 1, "stream_refused")
    b.add("rows_dropped", 7, "queue_full")
    b.add("requests_unmonitored", 2, "stream_refused")
    b.add("modes_refused", 1, "async_scheduling")
    total = a.aggregate(b)
    assert total.reduce()["requests_unmonitored[stream_refused]"] == 3
    reg = CollectorRegistry()
    metrics = MonitorPromMetrics(
        SimpleNamespace(kv_transfer_config=None),
        {t: partial(t, registry=reg) for t in (Counter, Gauge, Histogram)},  # type: ignore[misc]
        ["model_name", "engine"],
        {0: ["m", "0"]},
    )
    metrics.observe(total.data, 0)
    got = partial(reg.get_sample_value)
    assert got("vllm:safety_monitor_requests_opened_total", {"model_name": "m", "engine": "0"}) == 3
    assert got("vllm:safety_monitor_requests_monitored_total", {"model_name": "m", "engine": "0"}) == 2
    labels = {"model_name": "m", "engine": "0", "reason": "stream_refused"}
    assert got("vllm:safety_monitor_requests_unmonitored_total", labels) == 3
    labels = {"model_name": "m", "engine": "0", "reason": "async_scheduling"}
    assert got("vllm:safety_monitor_modes_refused_total", labels) == 1


def test_projected_rows_keep_each_hook_points_own_width(sides: Any) -> None:
    """Each hook point has its own encoder slice, so the projected widths differ (K = 2 and 5
    here): the worker projects and hands over each hook point's rows apart."""
    sched, worker, _ = sides
    got: dict[str, dict[str, np.ndarray]] = {}

    class Capture(RecordingStreams):
        def push(self, batch: dict[str, dict[str, np.ndarray]], decisions: dict[str, dict[str, np.ndarray]]) -> None:
            for rid, rows in batch.items():
                got[rid] = rows

    worker.streams = Capture()  # type: ignore[assignment]
    g = torch.Generator().manual_seed(0)
    worker.slices = [(torch.randn(WIDTH, k, generator=g), torch.randn(k, generator=g)) for k in (2, 5)]
    rid = "proj-0000000a"
    run(sched, worker, step([new_req(rid, range(3), [6])], n_sched={rid: 3}))
    run(sched, worker, step(running=cached([(rid, 3, None)]), n_sched={rid: 1}))
    rows = got[rid]
    assert rows[HOOKS[0]].shape == (1, 2) and rows[HOOKS[1]].shape == (1, 5)
    for j, hp in enumerate(HOOKS):
        w, b = worker.slices[j]
        want = torch.full((1, WIDTH), float(position_code([6], 3, j))) @ w + b
        assert np.allclose(rows[hp], want.numpy(), atol=1e-5)


# -- withholding (hold_back_tokens) -------------------------------------------------------------


def outputs(*outs: Any) -> dict[int, Any]:
    from vllm.v1.engine import EngineCoreOutputs

    return {0: EngineCoreOutputs(outputs=list(outs))}


def out(rid: str, tokens: Sequence[int], finish: Any = None, **kw: Any) -> Any:
    from vllm.v1.engine import EngineCoreOutput

    return EngineCoreOutput(request_id=rid, new_token_ids=list(tokens), finish_reason=finish, **kw)


def sent(step_outputs: dict[int, Any]) -> dict[str, list[int]]:
    return {o.request_id: list(o.new_token_ids) for eco in step_outputs.values() for o in eco.outputs}


def test_withholding_releases_what_a_verdict_covers_or_the_bound_passed() -> None:
    """N = 3: a token is shown once a verdict without HALT covers it or 3 newer tokens exist; the
    finish waits for the last verdict and then brings the rest; a step with nothing to show sends
    nothing for that request, and its one-time fields go with the next output."""
    from vllm.v1.engine import FinishReason

    from monitor.integrations.vllm._withhold import Withholding

    w = Withholding(3)
    w.track("r")
    assert sent(w.apply(outputs(out("r", [1], prefill_stats=None, events=None)))) == {}
    assert sent(w.apply(outputs(out("r", [2])))) == {}
    assert sent(w.apply(outputs(out("r", [3])))) == {}
    assert sent(w.apply(outputs(out("r", [4])))) == {"r": [1]}  # 4 generated, bound 3
    w.on_report(WorkerReport(covered={"r": 3}))  # a verdict covers tokens 0..2
    assert sent(w.apply(outputs(out("r", [5])))) == {"r": [2, 3]}
    assert sent(w.apply(outputs(out("r", [6], FinishReason.LENGTH)))) == {}  # waits for the final verdict
    assert sent(w.apply(outputs())) == {}
    w.on_report(WorkerReport(done={"r"}))
    step_out = w.apply({})  # an idle step (the engine keeps stepping while the blocks are held)
    assert sent(step_out) == {"r": [4, 5, 6]}
    assert step_out[0].outputs[0].finish_reason == FinishReason.LENGTH and w.live == 0


def test_withholding_drops_held_tokens_on_halt_and_finishes_as_content_filter() -> None:
    from vllm.v1.engine import FinishReason

    from monitor.integrations.vllm._withhold import Withholding

    w = Withholding(8)
    for rid in ("mid", "final"):
        w.track(rid)
    assert sent(w.apply(outputs(out("mid", [1, 2]), out("final", [1, 2])))) == {}
    w.on_report(WorkerReport(covered={"mid": 1, "final": 2}))
    assert sent(w.apply(outputs(out("mid", [3]), out("final", [3])))) == {"mid": [1], "final": [1, 2]}
    # "mid" is halted while it runs: nothing more is shown; the scheduler's stop ends it
    w.on_report(WorkerReport(halted={"mid": "harmful_compliance"}))
    assert sent(w.apply(outputs(out("mid", [4])))) == {}
    halted = w.apply(outputs(out("mid", [5], FinishReason.STOP, stop_reason=HALT_STOP_REASON)))
    assert sent(halted) == {"mid": []} and halted[0].outputs[0].stop_reason == HALT_STOP_REASON
    # "final" finishes normally, and its last verdict says HALT: its held token is never shown
    assert sent(w.apply(outputs(out("final", [4], FinishReason.LENGTH)))) == {}
    w.on_report(WorkerReport(halted={"final": "harmful_compliance"}, done={"final"}))
    last = w.apply({})[0].outputs[0]
    assert (last.new_token_ids, last.finish_reason, last.stop_reason) == ([], FinishReason.STOP, HALT_STOP_REASON)
    assert w.tokens_withheld == 4 + 2 and w.live == 0  # mid: 2, 3, 4, 5; final: 3, 4


def test_withholding_fails_open_for_unmonitored_requests_and_forgets_aborted_ones() -> None:
    from vllm.v1.engine import FinishReason

    from monitor.integrations.vllm._withhold import Withholding

    w = Withholding(4)
    for rid in ("down", "gone", "logprobs"):
        w.track(rid)
    assert sent(w.apply(outputs(out("down", [1]), out("gone", [1])))) == {}
    w.on_report(WorkerReport(done={"down"}))  # its stream failed: no verdict will come
    assert sent(w.apply(outputs(out("down", [2])))) == {"down": [1, 2]}
    assert sent(w.apply(outputs(out("down", [3], FinishReason.STOP)))) == {"down": [3]}
    w.forget("gone")  # aborted by its client
    lp = out("logprobs", [7], new_logprobs=SimpleNamespace())
    assert sent(w.apply(outputs(lp))) == {"logprobs": [7]}  # aligned with its logprobs: untouched
    assert w.live == 0


def test_worker_holds_blocks_until_the_scheduler_knows_the_last_verdict(sides: Any) -> None:
    """With withholding the blocks of a finished request are freed only after a report that told
    the scheduler its last verdict came (so the engine is still stepping when it releases the
    held tokens)."""
    sched, worker, _ = sides
    worker.settings = AdapterSettings(sidecar="x", hook_points=HOOKS, projected=False, hold_back_tokens=4)
    rid = "held-0000000a"
    run(sched, worker, step([new_req(rid, range(3), [1])], n_sched={rid: 3}))
    assert sched.finished(rid, [5])
    worker.after_step(sched.build_meta(step()))
    assert worker.take_sent_final() is None  # final chunk handed over, last verdict not in
    worker.on_progress(rid, 1, True)
    assert worker.take_sent_final() is None  # not yet reported to the scheduler
    report = worker.take_report()
    assert report is not None and report.done == {rid} and report.covered == {rid: 1}
    assert worker.take_sent_final() == {rid} and worker.live == 0


def test_withholding_self_test_passes_on_this_vllm() -> None:
    from vllm.config import VllmConfig

    cfg = SimpleNamespace(
        scheduler_config=SimpleNamespace(get_scheduler_cls=VllmConfig().scheduler_config.get_scheduler_cls)
    )
    _patches.install_withholding(cfg)
    _patches.check_withholding_takes_effect()


def test_withholding_carries_one_time_fields_and_respects_advice_only_and_exemptions() -> None:
    """Review findings: prompt logprobs and events of a withheld output reach the client with the
    next one (events in order); with ``halt`` off a HALT advice drops nothing; a resumable session
    is not withheld; per-token aligned fields (a sampling mask) pass through."""
    from vllm.v1.engine import FinishReason

    from monitor.integrations.vllm._withhold import Withholding

    w = Withholding(1)
    w.track("r")
    first = out("r", [1], new_prompt_logprobs_tensors=SimpleNamespace(tag="prompt"), events=["scheduled"])
    assert sent(w.apply(outputs(first))) == {}
    step_out = w.apply(outputs(out("r", [2], events=["preempted"])))
    got = step_out[0].outputs[0]
    assert got.new_token_ids == [1] and got.new_prompt_logprobs_tensors.tag == "prompt"
    assert got.events == ["scheduled", "preempted"]

    advice = Withholding(8, drop_on_halt=False)
    advice.track("a")
    advice.apply(outputs(out("a", [1, 2])))
    advice.on_report(WorkerReport(halted={"a": "harmful_compliance"}, covered={"a": 2}))
    assert sent(advice.apply(outputs(out("a", [3])))) == {"a": [1, 2]}
    advice.on_report(WorkerReport(done={"a"}))
    last = advice.apply(outputs(out("a", [4], FinishReason.LENGTH)))[0].outputs[0]
    assert last.new_token_ids == [3, 4] and last.stop_reason != HALT_STOP_REASON

    w.exempt.add("session")
    w.track("session")
    assert sent(w.apply(outputs(out("session", [5], FinishReason.STOP)))) == {"session": [5]}
    w.track("masked")
    assert sent(w.apply(outputs(out("masked", [6], new_sampling_mask=SimpleNamespace())))) == {"masked": [6]}
    assert "masked" not in w.held and "session" not in w.held


def test_worker_reports_done_once_for_requests_it_still_holds(sides: Any) -> None:
    """A stream that ended early reports done, and its final item reports done again after the
    request was released: the second must not stay behind in the worker."""
    sched, worker, _ = sides
    worker.settings = AdapterSettings(sidecar="x", hook_points=HOOKS, projected=False, hold_back_tokens=4)
    rid = "twice-0000000a"
    run(sched, worker, step([new_req(rid, range(3), [1])], n_sched={rid: 3}))
    worker.on_progress(rid, -1, True)  # its stream failed mid-run
    assert worker.take_report() is not None
    assert sched.finished(rid, [5])
    worker.after_step(sched.build_meta(step()))
    assert worker.take_sent_final() == {rid}
    worker.on_progress(rid, -1, True)  # the final item's "done", after the release
    assert worker.take_report() is None and worker.live == 0
