"""vLLM's general-plugin entry point (``vllm.general_plugins``): loaded in every vLLM process.

What it does, in each process, and only what is harmless when monitoring is off:
- registers ``SafetyMonitorConnector`` by name with vLLM's KV-connector factory;
- in the API server, shows a request the sidecar halted (``stop_reason == "safety_monitor_halt"``)
  with ``finish_reason: "content_filter"``, as OpenAI's API names output withheld by a filter;
- when ``SAFETY_MONITOR_SIDECAR`` is set and the user gave neither a speculative nor a KV-transfer
  config, fills both in (``engine_config``) so ``vllm serve`` / ``LLM(...)`` need no extra flags.
  The hook points come from ``SAFETY_MONITOR_HOOK_POINTS`` or the sidecar's catalog.
- whenever an engine is configured with our connector (by the plugin or by ``engine_config``),
  checks the served model's architecture and the aux-hidden-state ids before any weights load
  (``check_engine_model``: one-line ``ArchitectureError`` for Gemma 2/3, unknown families, hook
  points past the last layer).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monitor.integrations.vllm._settings import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    ENV_PREFIX,
    HALT_STOP_REASON,
    AdapterSettings,
    check_engine_model,
    engine_config,
    wait_for_catalog,
)

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs
CONTENT_FILTER = "content_filter"


def register() -> None:
    """The plugin function vLLM calls (possibly several times per process)."""
    _register_connector()
    _map_halt_to_content_filter()
    _wrap_create_engine_config()


def _register_connector() -> None:
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, "SafetyMonitorConnector")


def _map_halt_to_content_filter() -> None:
    from vllm.v1.engine import output_processor

    state_cls = output_processor.RequestState
    original = state_cls._new_completion_output
    if getattr(original, "_safety_monitor", False):
        return

    def _new_completion_output(self: Any, token_ids: Any, finish_reason: Any, stop_reason: Any) -> Any:
        out = original(self, token_ids, finish_reason, stop_reason)
        if stop_reason == HALT_STOP_REASON and out.finish_reason is not None:
            out.finish_reason = CONTENT_FILTER
        return out

    _new_completion_output._safety_monitor = True  # type: ignore[attr-defined]
    state_cls._new_completion_output = _new_completion_output


def _wrap_create_engine_config() -> None:
    from vllm.engine.arg_utils import EngineArgs

    original = EngineArgs.create_engine_config
    if getattr(original, "_safety_monitor", False):
        return

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get(ENV_PREFIX + "SIDECAR"):
            _autoconfigure(self)
        vllm_config = original(self, *args, **kwargs)
        kv = vllm_config.kv_transfer_config
        if kv is not None and kv.kv_connector == CONNECTOR_NAME:
            check_engine_model(vllm_config, AdapterSettings.from_sources(kv.kv_connector_extra_config))
        return vllm_config

    create_engine_config._safety_monitor = True  # type: ignore[attr-defined]
    EngineArgs.create_engine_config = create_engine_config


def _autoconfigure(engine_args: Any) -> None:
    """Fill in the speculative and KV-transfer configs when the user gave neither."""
    if engine_args.kv_transfer_config is None and engine_args.speculative_config is None:
        settings = resolve_settings()
        cfg = engine_config(settings)
        from vllm.config import KVTransferConfig

        engine_args.speculative_config = cfg["speculative_config"]
        engine_args.kv_transfer_config = KVTransferConfig(**cfg["kv_transfer_config"])
        log.info("safety monitor: monitoring %s through sidecar %s", settings.hook_points, settings.sidecar)
    elif engine_args.kv_transfer_config is None or engine_args.speculative_config is None:
        log.error(
            "safety monitor: %sSIDECAR is set but this engine already has a speculative or KV-transfer "
            "config; monitoring needs both slots and is OFF",
            ENV_PREFIX,
        )


def resolve_settings(settings: AdapterSettings | None = None) -> AdapterSettings:
    """``settings`` (default: from env) with hook points filled in from the sidecar's catalog when
    neither they nor ``SAFETY_MONITOR_HOOK_POINTS`` name any."""
    settings = settings or AdapterSettings.from_sources(None)
    if settings.hook_points:
        return settings
    from dataclasses import replace

    from monitor.client import MonitorClient

    client = MonitorClient(
        settings.sidecar,
        token=settings.token,
        tls_ca=settings.tls_ca,
        tls_cert=settings.tls_cert,
        tls_key=settings.tls_key,
    )
    try:
        catalog = wait_for_catalog(
            lambda t: client.get_detectors(timeout=t), settings.sidecar, settings.connect_timeout
        )
    finally:
        client.close()
    return replace(settings, hook_points=tuple(hp.name for hp in catalog.hook_points))
