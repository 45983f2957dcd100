"""A vLLM KV connector that streams every request's residual-stream rows to the sidecar per step.

Capture: vLLM's ``extract_hidden_states`` speculative method stores the hook layers' output of
every computed position in a cache-only KV layer, inside the model's own step (so it works under
torch.compile and CUDA graphs and for prefix-cached blocks, which keep their rows). This connector
never touches the forward pass. After each step (``wait_for_save``, which vLLM runs after the
pseudo-draft wrote the step's rows) the worker side gathers, in one indexing op for the whole
batch, the rows of the positions that became final this step, optionally projects them through
the bundle's encoder slice on the device, and hands them to ``SidecarStreams`` (a background
thread; the step never waits for the network).

Which rows: the decision position ``prompt_len - 1`` (the last prompt-template token, where the
model decides how to answer; sent once, in the stream's ``decision`` field: vLLM always computes
that position afresh, prefix cache or not) and the response tokens, positions
``prompt_len .. len(tokens) - 2``, the inputs the detectors were fitted on. The last generated
token is never fed back through the model, so it has no row in any capture method: a verdict
covers all output tokens but the last. Speculative
positions are read only once accepted (the scheduler's ``num_computed_tokens`` moved past them).

HALT: the sidecar's advice comes back on the stream; the worker reports the request in its
per-step worker metadata; the scheduler side marks it, and the next stop check finishes it with
``stop_reason = "safety_monitor_halt"``. The API server (see ``_plugin``) shows that as
``finish_reason: "content_filter"``.

Scheduler side and worker side are the same class (vLLM builds one per role).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)

from monitor.architectures import check_hidden_size
from monitor.integrations.vllm._settings import (
    HALT_STOP_REASON,
    AdapterSettings,
    check_engine_model,
    external_id,
    wait_for_catalog,
)
from monitor.integrations.vllm._streams import SidecarStreams

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs


@dataclass
class _Read:
    """Positions ``[start, end)`` of one request whose rows became final this step."""

    req_id: str
    start: int
    end: int


@dataclass
class StepMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step."""

    opened: dict[str, list[int]] = field(default_factory=dict)  # req -> prompt token ids
    blocks: dict[str, list[int]] = field(default_factory=dict)  # req -> hidden-state block ids to append
    replaced: set[str] = field(default_factory=set)  # resumed after preemption: blocks replace the old ones
    reads: list[_Read] = field(default_factory=list)
    finished: dict[str, list[int]] = field(default_factory=dict)  # req -> output token ids


@dataclass
class HaltReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: requests the sidecar advised to halt."""

    halted: dict[str, str] = field(default_factory=dict)  # engine request id -> reason

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, HaltReport):
            self.halted.update(other.halted)
        return self


class SafetyMonitorConnector(KVConnectorBase_V1):
    """Streams response-token activations to the safety-monitor sidecar; honours HALT."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        spec = vllm_config.speculative_config
        if spec is None or spec.method != "extract_hidden_states":
            raise ValueError(
                "speculative_config: expected method 'extract_hidden_states' (it writes the hook layers' "
                "rows that this connector streams); use monitor.integrations.vllm.engine_config()"
            )
        self.settings = AdapterSettings.from_sources(self._kv_transfer_config.kv_connector_extra_config)
        check_engine_model(vllm_config, self.settings)  # the plugin checked too, unless plugins are off
        self._group = _hidden_state_group(kv_cache_config)
        self._block_size = _block_size(vllm_config, kv_cache_config, self._group)
        # scheduler side
        self._next_read: dict[str, int] = {}  # request -> first position not yet read (starts at the decision row)
        self._finished: dict[str, list[int]] = {}
        self._halt_marks: dict[str, str] = {}
        if role == KVConnectorRole.SCHEDULER and self.settings.halt:
            _install_halt_check(self._halt_marks)
        if role == KVConnectorRole.WORKER and not vllm_config.scheduler_config.async_scheduling:
            _drop_pseudo_drafts()
        # worker side
        self._kv: torch.Tensor | None = None
        self._blocks: dict[str, list[int]] = {}
        self._prompt_len: dict[str, int] = {}
        self._streams: SidecarStreams | None = None
        self._slices: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._halted_lock = threading.Lock()
        self._halted: dict[str, str] = {}
        self._ext_to_engine: dict[str, str] = {}
        self._sent_final: set[str] = set()
        self._next_report = 0.0
        self._reported = (0, 0)

    # ==== scheduler side =======================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # nothing to load: store-only

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = StepMetadata(finished=self._finished)
        self._finished = {}
        spec = scheduler_output.scheduled_spec_decode_tokens
        n_sched = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            prompt = list(new.prompt_token_ids or ())
            meta.opened[new.req_id] = prompt
            meta.blocks[new.req_id] = list(new.block_ids[self._group])
            meta.replaced.add(new.req_id)
            self._next_read.setdefault(new.req_id, max(len(prompt) - 1, 0))
            self._plan(meta, new.req_id, new.num_computed_tokens, n_sched, spec)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new_blocks = cached.new_block_ids[i]
            if new_blocks is not None:
                meta.blocks[req_id] = list(new_blocks[self._group])
                if req_id in cached.resumed_req_ids:
                    meta.replaced.add(req_id)
            if req_id in self._next_read:
                self._plan(meta, req_id, cached.num_computed_tokens[i], n_sched, spec)
        return meta

    def _plan(
        self, meta: StepMetadata, req_id: str, computed: int, n_sched: dict[str, int], spec: dict[str, list[int]]
    ) -> None:
        # Positions computed this step, minus speculative ones (read once accepted, next step).
        end = computed + n_sched.get(req_id, 0) - len(spec.get(req_id, ()))
        start = self._next_read[req_id]
        if end > start:
            meta.reads.append(_Read(req_id, start, end))
            self._next_read[req_id] = end

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, HaltReport):
            self._halt_marks.update(report.halted)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Keep the blocks until the worker has sent the final chunk: that keeps the engine
        stepping (with empty steps when idle) so the final metadata reaches the worker."""
        self._next_read.pop(request.request_id, None)
        self._halt_marks.pop(request.request_id, None)
        self._finished[request.request_id] = list(request.output_token_ids)
        return True, None

    def request_finished_all_groups(
        self, request: Request, block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        return self.request_finished(request, [])

    def get_finished_count(self) -> int:
        return 1  # only TP rank 0 streams, so only it reports a finished request

    # ==== worker side ==========================================================================
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.config import get_layers_from_vllm_config
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank
        from vllm.model_executor.models.extract_hidden_states import CacheOnlyAttentionLayer

        layers = get_layers_from_vllm_config(self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches))
        if len(layers) != 1:
            raise ValueError(f"hidden-state cache: expected 1 CacheOnlyAttentionLayer, got {len(layers)}")
        self._kv = kv_caches[next(iter(layers))]
        if self._kv.shape[2] != self._block_size:
            raise ValueError(f"hidden-state cache: block size {self._kv.shape[2]} != {self._block_size}")
        if get_tensor_model_parallel_rank() != 0:
            return  # every TP rank holds the same rows: rank 0 streams them
        self._start_streams()

    def _start_streams(self) -> None:
        s = self.settings
        tokenizer = _load_tokenizer(self._vllm_config)
        self._streams = streams = SidecarStreams(
            s.sidecar,
            token=s.token,
            tls_ca=s.tls_ca,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            projected=s.projected,
            max_queued_rows=s.max_queued_rows,
            chunk_tokens=s.chunk_tokens,
            on_halt=self._on_halt,
            decode=(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None,
        )
        catalog = wait_for_catalog(lambda t: streams.catalog(timeout=t), s.sidecar, s.connect_timeout)
        self._streams.model = catalog.model
        by_name = {hp.name: hp for hp in catalog.hook_points}
        missing = [hp for hp in s.hook_points if hp not in by_name]
        if missing:
            raise ValueError(f"hook_points: {missing} are not in the sidecar's catalog {sorted(by_name)}")
        for hp in s.hook_points:  # a bundle made for another model
            check_hidden_size(self._vllm_config.model_config.hf_config, by_name[hp].d_model, f"bundle d_model of {hp}")
        if s.projected:
            slices = []
            for hp in s.hook_points:
                sl = by_name[hp].encoder_slice
                if sl is None:
                    raise ValueError(f"projected: the sidecar has no encoder slice for {hp}; set projected=false")
                dev = self._kv.device if self._kv is not None else torch.device("cpu")
                slices.append((torch.as_tensor(sl.w_enc, device=dev), torch.as_tensor(sl.b_enc, device=dev)))
            self._slices = slices
        log.info(
            "safety monitor: streaming %s to %s (model %s, %s)",
            ", ".join(s.hook_points),
            s.sidecar,
            catalog.model,
            "projected" if s.projected else "full rows",
        )

    def _on_halt(self, external: str, reason: str) -> None:
        engine_id = self._ext_to_engine.get(external, external)
        with self._halted_lock:
            self._halted[engine_id] = reason

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # the pseudo-draft already wrote the rows; they are read after the step

    def wait_for_save(self) -> None:
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, StepMetadata):
            return
        streams = self._streams
        if streams is None:  # TP rank > 0: rank 0 streams; only acknowledge finished requests
            return
        for req_id, prompt in meta.opened.items():
            self._prompt_len[req_id] = len(prompt)
            ext = external_id(req_id)
            self._ext_to_engine[ext] = req_id
            streams.open(ext, prompt)
        for req_id, blocks in meta.blocks.items():
            if req_id in meta.replaced:
                self._blocks[req_id] = list(blocks)
            else:
                self._blocks.setdefault(req_id, []).extend(blocks)
        if meta.reads:
            streams.push(*self._gather(meta.reads))
        if meta.finished:
            log.debug("safety monitor: finished %s", list(meta.finished))
        for req_id, tokens in meta.finished.items():
            self._blocks.pop(req_id, None)
            self._prompt_len.pop(req_id, None)
            ext = external_id(req_id)
            self._ext_to_engine.pop(ext, None)
            streams.finish(ext, tokens)
            self._sent_final.add(req_id)
        self._report_losses(streams)

    def _report_losses(self, streams: SidecarStreams, every: float = 30.0) -> None:
        """Log dropped rows and unmonitored requests (at most every ``every`` s), never silently."""
        now = time.monotonic()
        if now < self._next_report:
            return
        self._next_report = now + every
        st = streams.stats
        if (st.rows_dropped, st.failed) != self._reported:
            self._reported = (st.rows_dropped, st.failed)
            log.warning(
                "safety monitor: %d rows dropped (queue full or stream failed), %d of %d requests unmonitored, "
                "%d rows sent, %d halts so far",
                st.rows_dropped,
                st.failed,
                st.requests,
                st.rows_sent,
                st.halts,
            )

    def _gather(self, reads: list[_Read]) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, dict[str, np.ndarray]]]:
        """One index op for the whole batch: slot = block[p // bs] * bs + p % bs.

        Returns the response rows and, for requests whose read starts at the decision position
        (``prompt_len - 1``), that row apart: ``(rows, decisions)``, both keyed by request id.
        """
        assert self._kv is not None
        bs = self._block_size
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
        idx = torch.tensor(slots, dtype=torch.long, device=self._kv.device)
        rows = self._kv[idx // bs, :, idx % bs]  # [n, hook points, d_model]
        per_hook = []
        for j, _hp in enumerate(self.settings.hook_points):
            x = rows[:, j, :]
            if self._slices is not None:
                w, bias = self._slices[j]
                x = x.to(torch.float32) @ w + bias
            per_hook.append(x.to(torch.float32).cpu().numpy())
        out: dict[str, dict[str, np.ndarray]] = {}
        decisions: dict[str, dict[str, np.ndarray]] = {}
        at = 0
        for req_id, n, has_decision in spans:
            first = at
            if n and has_decision:
                decisions[external_id(req_id)] = {
                    hp: per_hook[j][at : at + 1] for j, hp in enumerate(self.settings.hook_points)
                }
                first += 1
            if at + n > first:
                out[external_id(req_id)] = {
                    hp: per_hook[j][first : at + n] for j, hp in enumerate(self.settings.hook_points)
                }
            at += n
        return out, decisions

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose final chunk was handed to the streams: their blocks may be freed."""
        if not self._sent_final:
            return None, None
        done, self._sent_final = self._sent_final, set()
        return done, None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        with self._halted_lock:
            if not self._halted:
                return None
            report, self._halted = HaltReport(dict(self._halted)), {}
        return report

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """The layout vLLM's own hidden-states connector reads with the same indexing."""
        return "LBNHC"

    def shutdown(self) -> None:
        if self._streams is not None:
            self._streams.close()
            self._streams = None


def _hidden_state_group(kv_cache_config: KVCacheConfig | None) -> int:
    """Index of the KV cache group that holds the extracted hidden states."""
    if kv_cache_config is None:
        return 0
    from vllm.v1.kv_cache_interface import HiddenStateCacheSpec

    groups = kv_cache_config.kv_cache_groups
    ids = [i for i, g in enumerate(groups) if isinstance(g.kv_cache_spec, HiddenStateCacheSpec)]
    if len(ids) == 1:
        return ids[0]
    if not ids and len(groups) == 1:  # one group for every layer (no hybrid KV cache manager)
        return 0
    raise ValueError(f"hidden-state cache: expected one HiddenStateCacheSpec group among {len(groups)}, got {len(ids)}")


def _block_size(vllm_config: VllmConfig, kv_cache_config: KVCacheConfig | None, group: int) -> int:
    if kv_cache_config is None:
        return int(vllm_config.cache_config.block_size)
    return int(kv_cache_config.kv_cache_groups[group].kv_cache_spec.block_size)


def _load_tokenizer(vllm_config: VllmConfig) -> Any:
    try:
        from transformers import AutoTokenizer

        mc = vllm_config.model_config
        return AutoTokenizer.from_pretrained(mc.tokenizer, revision=mc.tokenizer_revision)
    except Exception:
        log.exception("safety monitor: no tokenizer; verdicts will carry no text")
        return None


def _drop_pseudo_drafts() -> None:
    """Keep extract_hidden_states' capture, drop its pseudo-draft token.

    The method's proposer caches the step's hidden states and then proposes the sampled token
    again as a one-token "draft", which the next step verifies (and nearly always rejects): every
    decode step computes two positions per request instead of one. On a GPU that position is
    almost free; on a CPU, where the forward is compute-bound, it cost a third of the throughput
    (measured: docs/vllm.md). Returning no drafts (the same shape ngram uses when it has no
    proposal) keeps the capture and schedules one position per request. With async scheduling
    the scheduler reserves draft slots before proposals exist, so there it is left alone.
    """
    from vllm.v1.spec_decode.extract_hidden_states import ExtractHiddenStatesProposer

    original = ExtractHiddenStatesProposer.propose
    if getattr(original, "_safety_monitor", False):
        return

    def propose(self: Any, *args: Any, **kwargs: Any) -> Any:
        drafts = original(self, *args, **kwargs)  # caches the hidden states
        return [[] for _ in range(int(drafts.shape[0]))]

    propose._safety_monitor = True  # type: ignore[attr-defined]
    ExtractHiddenStatesProposer.propose = propose


_halt_marks_ref: dict[str, str] | None = None


def _install_halt_check(marks: dict[str, str]) -> None:
    """Wrap the scheduler's stop check once: a request the sidecar halted stops at its next token."""
    global _halt_marks_ref
    from vllm.v1.core.sched import scheduler as sched_mod
    from vllm.v1.request import RequestStatus

    _halt_marks_ref = marks
    original = sched_mod.check_stop
    if getattr(original, "_safety_monitor", False):
        return

    def check_stop(request: Any, max_model_len: int) -> bool:
        if original(request, max_model_len):
            return True
        ref = _halt_marks_ref
        if ref is not None and request.request_id in ref:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = HALT_STOP_REASON
            return True
        return False

    check_stop._safety_monitor = True  # type: ignore[attr-defined]
    sched_mod.check_stop = check_stop
