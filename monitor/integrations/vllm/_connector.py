"""A vLLM KV connector that streams every request's residual-stream rows to the sidecar per step.

Capture: vLLM's ``extract_hidden_states`` speculative method stores the hook layers' output of
every computed position in a cache-only KV layer, inside the model's own step (so it works under
torch.compile and CUDA graphs and for prefix-cached blocks, which keep their rows). This connector
never touches the forward pass.

Shaped like vLLM's own connectors (``NixlConnector``): this class is a thin facade; vLLM builds one
per role, and each forwards to its side, ``MonitorScheduler`` (``_scheduler``: which positions are
final at each step) or ``MonitorWorker`` (``_worker``: gather, project, hand to the streams). The
patches of vLLM internals live in ``_patches``; counters go out as vLLM connector stats (``_stats``).

Which rows: the decision position ``prompt_len - 1`` (the last prompt-template token, where the
model decides how to answer; sent once, in the stream's ``decision`` field) and the response
tokens, positions ``prompt_len .. len(tokens) - 2``, the inputs the detectors were fitted on. The
last generated token is never fed back through the model, so it has no row: a verdict covers all
output tokens but the last.

HALT: the sidecar's advice comes back on the stream; the worker reports the request in its
per-step worker metadata; the scheduler side marks it, and the next stop check finishes it with
``stop_reason = "safety_monitor_halt"``, shown by the API server as ``finish_reason:
"content_filter"``.

Monitoring off: an engine mode the adapter cannot read correctly (async scheduling), an
unsupported vLLM version or a patch that failed its self-test turn this connector into a no-op for
the engine (logged once, counted in ``vllm:safety_monitor_modes_refused_total``); vLLM serves on.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
    SupportsHMA,
)

from monitor.architectures import check_hidden_size
from monitor.client import Catalog
from monitor.integrations.vllm import _patches
from monitor.integrations.vllm._metadata import StepMetadata, WorkerReport
from monitor.integrations.vllm._scheduler import MonitorScheduler, refused_mode
from monitor.integrations.vllm._settings import AdapterSettings, check_engine_model
from monitor.integrations.vllm._stats import MonitorPromMetrics, MonitorStats
from monitor.integrations.vllm._streams import SidecarStreams
from monitor.integrations.vllm._withhold import Withholding
from monitor.integrations.vllm._worker import MonitorWorker

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs


class SafetyMonitorConnector(KVConnectorBase_V1, SupportsHMA):
    """Streams response-token activations to the safety-monitor sidecar; honours HALT."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        spec = vllm_config.speculative_config
        if spec is None or spec.method != "extract_hidden_states":
            raise ValueError(
                "speculative_config: expected method 'extract_hidden_states' (it writes the hook layers' "
                "rows that this connector streams); use monitor.integrations.vllm.engine_config()"
            )
        extra = self._kv_transfer_config.kv_connector_extra_config
        self.settings = AdapterSettings.from_sources(extra)
        check_engine_model(vllm_config, self.settings)  # the plugin checked too, unless plugins are off
        group = _hidden_state_group(kv_cache_config)
        self.off: str | None = refused_mode(vllm_config) or _patches.version_problem()
        self._stats = MonitorStats()
        if self.off is not None and role == KVConnectorRole.SCHEDULER:
            log.error("safety monitor: %s; monitoring is OFF for this engine", self.off)
        if (extra or {}).get("async_scheduling_refused"):  # the plugin turned it off for us
            self._stats.add("modes_refused", 1, "async_scheduling")
        self.scheduler: MonitorScheduler | None = None
        self.worker: MonitorWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = MonitorScheduler(group)
            if self.off is None and self.settings.halt:
                self.off = _patches.guarded("check_stop", lambda: _install_and_test_halt(self.scheduler))
            if self.off is not None:
                self._stats.add("modes_refused", 1, _reason(self.off))
            elif self.settings.hold_back_tokens > 0:
                self._withhold(vllm_config, self.scheduler)
        else:
            self.worker = MonitorWorker(self.settings, _block_size(vllm_config, kv_cache_config, group))
            if self.off is None and not vllm_config.use_v2_model_runner:
                _patches.guarded("extract_hidden_states proposer", _patches.drop_pseudo_drafts)  # cost only

    def _withhold(self, vllm_config: VllmConfig, scheduler: MonitorScheduler) -> None:
        """Withholding on, if its patch takes effect; else off (logged, counted), monitoring on."""

        def install() -> None:
            _patches.install_withholding(vllm_config)
            _patches.check_withholding_takes_effect()

        problem = _patches.guarded("update_from_output", install)
        if problem is None:
            n = self.settings.hold_back_tokens
            scheduler.withholding = Withholding(n, drop_on_halt=self.settings.halt)
            log.info("safety monitor: withholding up to %d tokens until a verdict covers them", n)
        else:
            self._stats.add("modes_refused", 1, _reason(problem))

    # ==== scheduler side =======================================================================
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        return 0, False  # nothing to load: store-only

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        sched = self.scheduler
        if sched is None:
            return None
        sched.note_trace(request.request_id, getattr(request, "trace_headers", None))
        if sched.withholding is None or not getattr(request, "resumable", False):
            return None
        if request.request_id not in sched.next_read:  # new: its turns finish without the request ending
            sched.withholding.exempt.add(request.request_id)
        return None

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.scheduler is not None
        if self.off is not None:
            return StepMetadata()
        return self.scheduler.build_meta(scheduler_output)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        report = getattr(connector_output, "kv_connector_worker_meta", None)
        if isinstance(report, WorkerReport) and self.scheduler is not None:
            before = self.scheduler.halts_applied
            self.scheduler.on_worker_report(report)
            self._stats.add("halts_applied", self.scheduler.halts_applied - before)

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Hold a monitored request's blocks until the worker has sent its final chunk: that keeps
        the engine stepping (with empty steps when idle) so the final metadata reaches the worker."""
        assert self.scheduler is not None
        withholding = self.scheduler.withholding
        if withholding is not None and request.status == _aborted():
            withholding.forget(request.request_id)  # the client went away: its held tokens go nowhere
        return self.scheduler.finished(request.request_id, request.output_token_ids), None

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

        assert self.worker is not None
        layers = get_layers_from_vllm_config(self._vllm_config, CacheOnlyAttentionLayer, list(kv_caches))
        if len(layers) != 1:
            raise ValueError(f"hidden-state cache: expected 1 CacheOnlyAttentionLayer, got {len(layers)}")
        kv = kv_caches[next(iter(layers))]
        if kv.shape[2] != self.worker.block_size:
            raise ValueError(f"hidden-state cache: block size {kv.shape[2]} != {self.worker.block_size}")
        self.worker.kv = kv
        if self.off is None and get_tensor_model_parallel_rank() == 0:  # every TP rank holds the same rows
            self._start_streams(self.worker)

    def _start_streams(self, worker: MonitorWorker) -> None:
        """Start streaming without waiting for the sidecar: vLLM starts even when it is down, and
        monitoring comes on (``_use_catalog``) once its catalog arrives; requests opened before
        are counted unmonitored (``sidecar_unavailable``)."""
        s = self.settings
        tokenizer = _load_tokenizer(self._vllm_config)
        streams = SidecarStreams(
            s.sidecar,
            token=s.token,
            tls_ca=s.tls_ca,
            tls_cert=s.tls_cert,
            tls_key=s.tls_key,
            projected=s.projected,
            max_queued_rows=s.max_queued_rows,
            chunk_tokens=s.chunk_tokens,
            send_timeout=s.send_timeout,
            on_halt=worker.on_halt,
            on_progress=worker.on_progress if s.hold_back_tokens > 0 else None,
            decode=(lambda ids: tokenizer.decode(ids, skip_special_tokens=True)) if tokenizer is not None else None,
        )
        worker.streams = streams
        streams.start_catalog(lambda catalog: self._use_catalog(worker, catalog))

    def _use_catalog(self, worker: MonitorWorker, catalog: Catalog) -> None:
        """On the streams' thread, once the sidecar answered: check it, load the encoder slices.
        Raising keeps monitoring off (logged, counted ``monitoring_off``); vLLM serves on."""
        s = self.settings
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
                dev = worker.kv.device if worker.kv is not None else torch.device("cpu")
                slices.append((torch.as_tensor(sl.w_enc, device=dev), torch.as_tensor(sl.b_enc, device=dev)))
            worker.slices = slices  # set before monitoring turns on: no monitored request sees it unset
        log.info(
            "safety monitor: streaming %s to %s (model %s, %s)",
            ", ".join(s.hook_points),
            s.sidecar,
            catalog.model,
            "projected" if s.projected else "full rows",
        )

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return None

    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return None  # the pseudo-draft already wrote the rows; they are read after the step

    def wait_for_save(self) -> None:
        if self.worker is None or not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if isinstance(meta, StepMetadata):
            self.worker.after_step(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose final chunk was handed to the streams: their blocks may be freed."""
        return (self.worker.take_sent_final() if self.worker is not None else None), None

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        return self.worker.take_report() if self.worker is not None else None

    # ==== counters (both sides) ================================================================
    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        stats, self._stats = self._stats, MonitorStats()
        withholding = self.scheduler.withholding if self.scheduler is not None else None
        if withholding is not None and withholding.tokens_withheld:
            stats.add("tokens_withheld", withholding.tokens_withheld)
            withholding.tokens_withheld = 0
        if self.worker is not None:
            more = self.worker.take_stats()
            if more is not None:
                stats.aggregate(more)
        return None if stats.is_empty() else stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return MonitorStats(data=data) if data is not None else MonitorStats()

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> MonitorPromMetrics:
        return MonitorPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        """The layout vLLM's own hidden-states connector reads with the same indexing."""
        return "LBNHC"

    def shutdown(self) -> None:
        if self.worker is not None and self.worker.streams is not None:
            self.worker.streams.close()
            self.worker.streams = None


def _aborted() -> Any:
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def _install_and_test_halt(scheduler: MonitorScheduler | None) -> None:
    assert scheduler is not None
    _patches.install_halt_check(scheduler.halt_marks)
    _patches.check_halt_takes_effect()


def _reason(problem: str) -> str:
    """A short label value for a refusal (metric label): the mode, or what failed."""
    if problem == "async_scheduling":
        return problem
    if problem.startswith("patch "):
        return "patch:" + problem.split()[1]
    return "vllm_version" if "version" in problem else "other"


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
