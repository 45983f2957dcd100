"""vLLM's general-plugin entry point (``vllm.general_plugins``): loaded in every vLLM process.

With ``SAFETY_MONITOR_SIDECAR`` unset the plugin does nothing at all: nothing is registered or
patched, so an installed but unused adapter cannot affect vLLM. (``LLM(model,
**engine_config(settings))`` needs no plugin: the config names the connector's module.) With it
set, in each process, each step behind ``_patches.guarded`` (a supported vLLM version, and any
exception logged and turned into "monitoring off", never raised into vLLM):

- registers ``SafetyMonitorConnector`` by name with vLLM's KV-connector factory;
- in the API server, shows a request the sidecar halted (``stop_reason == "safety_monitor_halt"``)
  with ``finish_reason: "content_filter"``, as OpenAI's API names output withheld by a filter;
- when the user gave neither a speculative nor a KV-transfer config, fills both in
  (``engine_config``) so ``vllm serve`` / ``LLM(...)`` need no extra flags. The hook points come
  from ``SAFETY_MONITOR_HOOK_POINTS`` or the sidecar's catalog;
- whenever an engine is configured with our connector, turns async scheduling off (the adapter
  reads rows only under sync scheduling until the async timeline is verified on a GPU: logged,
  and counted when the user had asked for it) and checks the served model's architecture and the
  aux-hidden-state ids before any weights load (``check_engine_model``).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monitor.integrations.vllm import _patches
from monitor.integrations.vllm._patches import CONTENT_FILTER
from monitor.integrations.vllm._settings import (
    CONNECTOR_MODULE,
    CONNECTOR_NAME,
    ENV_PREFIX,
    AdapterSettings,
    check_engine_model,
    engine_config,
    wait_for_catalog,
)

__all__ = ["CONTENT_FILTER", "register", "resolve_settings"]

log = logging.getLogger("vllm.safety_monitor")  # a child of vLLM's logger: shows in its logs


def register() -> None:
    """The plugin function vLLM calls (possibly several times per process); never raises."""
    if not os.environ.get(ENV_PREFIX + "SIDECAR"):
        return
    if _patches.guarded(
        "KVConnectorFactory", lambda: _patches.register_connector(CONNECTOR_NAME, CONNECTOR_MODULE, CONNECTOR_NAME)
    ):
        return
    _patches.guarded("content_filter", _install_content_filter)
    _patches.guarded("create_engine_config", lambda: _patches.wrap_create_engine_config(_before_config, _after_config))


def _install_content_filter() -> None:
    _patches.map_halt_to_content_filter()
    _patches.check_content_filter_takes_effect()


def _before_config(engine_args: Any) -> None:
    """Fill in the monitor's configs when the user gave neither; keep scheduling sync for it."""
    try:
        _autoconfigure(engine_args)
        kv = engine_args.kv_transfer_config
        if kv is not None and getattr(kv, "kv_connector", None) == CONNECTOR_NAME:
            force_sync_scheduling(engine_args, kv)
    except Exception as exc:  # the user's vLLM must start even if this fails (monitoring then is off)
        log.error("safety monitor: could not configure the engine (%s: %s); monitoring is OFF", type(exc).__name__, exc)


def force_sync_scheduling(engine_args: Any, kv: Any) -> None:
    """Async scheduling off: the adapter's read plan is verified only for sync scheduling."""
    if engine_args.async_scheduling:
        log.warning(
            "safety monitor: async scheduling turned OFF: the adapter reads rows only under sync scheduling "
            "until its async timeline is verified on a GPU (docs/vllm.md); counted in "
            'vllm:safety_monitor_modes_refused_total{reason="async_scheduling"}'
        )
        extra = dict(kv.kv_connector_extra_config or {})
        extra["async_scheduling_refused"] = True
        kv.kv_connector_extra_config = extra
    engine_args.async_scheduling = False


def _after_config(vllm_config: Any) -> None:
    kv = vllm_config.kv_transfer_config
    if kv is not None and kv.kv_connector == CONNECTOR_NAME:
        check_engine_model(vllm_config, AdapterSettings.from_sources(kv.kv_connector_extra_config))


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
