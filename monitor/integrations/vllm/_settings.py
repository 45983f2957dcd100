"""The adapter's settings: ``kv_connector_extra_config`` keys, with ``SAFETY_MONITOR_*`` env as fallback."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from monitor import architectures
from monitor.client import Catalog, ClientError
from monitor.hook_points import layer_of

ENV_PREFIX = "SAFETY_MONITOR_"
SECRET_KEYS = ("token", "tls_ca", "tls_cert", "tls_key")  # never in kv_connector_extra_config (vLLM logs it)
CONNECTOR_NAME = "SafetyMonitorConnector"
CONNECTOR_MODULE = "monitor.integrations.vllm._connector"
# What a halted request's stop_reason says; the API server maps it to finish_reason "content_filter".
HALT_STOP_REASON = "safety_monitor_halt"


_ENGINE_SUFFIX = re.compile(r"-[0-9a-f]{8}$")


def external_id(request_id: str) -> str:
    """The id the client sees: vLLM appends ``-<8 hex>`` to the external id inside the engine.

    >>> external_id("chatcmpl-3f2a-9b1c0d2e")
    'chatcmpl-3f2a'
    """
    return _ENGINE_SUFFIX.sub("", request_id)


def _flag(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{key}: expected true/false, got {value!r}")


@dataclass(frozen=True)
class AdapterSettings:
    """Where the sidecar is and how the adapter talks to it."""

    sidecar: str
    hook_points: tuple[str, ...] = ()
    token: str | None = None
    projected: bool = True  # apply the encoder slice on the engine's device, ship K values per token
    halt: bool = True  # abort a request in the engine when the sidecar advises HALT
    max_queued_rows: int = 65536  # rows waiting for the network, all requests together; more are dropped
    chunk_tokens: int = 16  # rows per ScoreStream chunk (HALT advice is at most one chunk late)
    connect_timeout: float = 30.0  # how long resolve_settings waits for the catalog (hook points not given)
    send_timeout: float = 5.0  # a chunk without a verdict this long leaves its request unmonitored
    # Withholding (opt-in): the client sees a generated token only once a verdict covers it or N
    # newer tokens exist; a HALT then keeps the flagged tokens from the client (docs/vllm.md)
    hold_back_tokens: int = 0
    tls_ca: str | None = None  # PEM CA of a TLS sidecar (with tls_cert/tls_key: mutual TLS)
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_sources(
        cls, extra: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> AdapterSettings:
        """``extra`` (kv_connector_extra_config) wins over ``SAFETY_MONITOR_<KEY>`` env."""
        extra = dict(extra or {})
        env = os.environ if env is None else env

        def get(key: str, default: Any = None) -> Any:
            if key in extra and extra[key] is not None:
                return extra[key]
            return env.get(ENV_PREFIX + key.upper(), default)

        sidecar = get("sidecar")
        if not sidecar:
            raise ValueError(
                "sidecar: expected the sidecar's gRPC address (host:port) in kv_connector_extra_config "
                f"or {ENV_PREFIX}SIDECAR, got none"
            )
        hooks = get("hook_points", ())
        if isinstance(hooks, str):
            hooks = tuple(h.strip() for h in hooks.split(",") if h.strip())
        for hp in hooks:
            layer_of(hp)  # raises naming the expected form
        try:
            max_rows = int(get("max_queued_rows", 65536))
            chunk = int(get("chunk_tokens", 16))
            timeout = float(get("connect_timeout", 30.0))
            send_timeout = float(get("send_timeout", 5.0))
            hold_back = int(get("hold_back_tokens", 0))
        except ValueError as exc:
            raise ValueError(
                "max_queued_rows / chunk_tokens / connect_timeout / send_timeout / hold_back_tokens: "
                f"expected numbers ({exc})"
            ) from None
        if hold_back < 0:
            raise ValueError(f"hold_back_tokens: expected >= 0 (0: off), got {hold_back}")
        if send_timeout <= 0:
            raise ValueError(f"send_timeout: expected > 0 seconds, got {send_timeout}")
        if max_rows < 1:
            raise ValueError(f"max_queued_rows: expected >= 1, got {max_rows}")
        if chunk < 1:
            raise ValueError(f"chunk_tokens: expected >= 1, got {chunk}")
        return cls(
            sidecar=str(sidecar),
            hook_points=tuple(hooks),
            token=get("token") or None,
            projected=_flag(get("projected", True), "projected"),
            halt=_flag(get("halt", True), "halt"),
            max_queued_rows=max_rows,
            chunk_tokens=chunk,
            connect_timeout=timeout,
            send_timeout=send_timeout,
            hold_back_tokens=hold_back,
            tls_ca=get("tls_ca") or None,
            tls_cert=get("tls_cert") or None,
            tls_key=get("tls_key") or None,
        )

    def extra_config(self) -> dict[str, Any]:
        """These settings as ``kv_connector_extra_config`` (what the engine ships to its workers).

        Without the token and the TLS paths: vLLM logs this config at start-up. Those travel in
        the environment (``SAFETY_MONITOR_TOKEN``, ``SAFETY_MONITOR_TLS_CA`` and the other TLS
        keys), which vLLM's engine and worker processes inherit (``export_secrets``)."""
        return {
            "sidecar": self.sidecar,
            "hook_points": list(self.hook_points),
            "projected": self.projected,
            "halt": self.halt,
            "max_queued_rows": self.max_queued_rows,
            "chunk_tokens": self.chunk_tokens,
            "connect_timeout": self.connect_timeout,
            "send_timeout": self.send_timeout,
            "hold_back_tokens": self.hold_back_tokens,
        }

    def export_secrets(self, env: Any = None) -> None:
        """Put the token and TLS paths into the environment the engine's processes inherit (a
        value already there for the same key must agree: two sidecars' tokens cannot share it)."""
        env = os.environ if env is None else env
        for key in SECRET_KEYS:
            value = getattr(self, key)
            if value is None:
                continue
            name = ENV_PREFIX + key.upper()
            if env.get(name, value) != value:
                raise ValueError(f"{key}: {name} is already set to another value in this process")
            env[name] = value


def vllm_layer_ids(hook_points: Sequence[str], architecture: str | None = None) -> list[int]:
    """vLLM's aux hidden-state ids for the hook points: ``blocks.L.hook_resid_post`` is L + 1.

    vLLM 0.32 counts them from the embeddings (id 0) for every family that returns aux hidden
    states (``monitor.architectures``). With ``architecture`` (``config.architectures[0]``) a
    family vLLM cannot capture (Gemma 2/3) or an unknown one raises, naming it; without it the
    rule is applied as is, and the served model is checked when the engine is configured
    (``check_engine_model``).
    """
    if architecture is not None:
        return architectures.vllm_layer_ids(architecture, hook_points)
    return [layer_of(hp) + 1 for hp in hook_points]


def ascending(hook_points: Sequence[str]) -> tuple[str, ...]:
    """Hook points in layer order, once each: the order vLLM stacks the captured rows in."""
    return tuple(sorted(set(hook_points), key=layer_of))


def engine_config(settings: AdapterSettings, architecture: str | None = None) -> dict[str, Any]:
    """The two engine arguments that switch the adapter on: ``LLM(model, **engine_config(s))``.

    vLLM's ``extract_hidden_states`` method (a pseudo-draft of speculative decoding) writes the
    chosen layers' rows into a cache-only KV layer inside the model's own step, so capture runs
    under torch.compile / CUDA graphs and covers prefix-cached blocks; our connector reads each
    step's new rows from that cache and streams them. vLLM returns the rows in ascending layer
    order, so the hook points are put in that order here (for the ids and for the connector).
    ``architecture``: the served model's ``config.architectures[0]``, checked when given.
    """
    if not settings.hook_points:
        raise ValueError("hook_points: expected at least one hook point (from the sidecar's catalog)")
    settings = replace(settings, hook_points=ascending(settings.hook_points))
    settings.export_secrets()
    return {
        # The adapter reads rows under sync scheduling only (``_scheduler``: the async timeline is
        # not verified on a GPU yet); vLLM would turn async on by default on a GPU.
        "async_scheduling": False,
        "speculative_config": {
            "method": "extract_hidden_states",
            "num_speculative_tokens": 1,
            "draft_model_config": {
                "hf_config": {"eagle_aux_hidden_state_layer_ids": vllm_layer_ids(settings.hook_points, architecture)}
            },
        },
        "kv_transfer_config": {
            "kv_connector": CONNECTOR_NAME,
            "kv_connector_module_path": CONNECTOR_MODULE,
            "kv_role": "kv_producer",
            "kv_connector_extra_config": settings.extra_config(),
        },
    }


def check_engine_model(vllm_config: Any, settings: AdapterSettings) -> None:
    """The served model fits the capture: a family vLLM captures, hook layers in range, the ids
    asked of the engine those of the hook points (``monitor.architectures.check_vllm_capture``).

    Duck-typed on vLLM's ``VllmConfig`` (no vLLM import here); raises ``ArchitectureError``.
    """
    mc = vllm_config.model_config
    archs = list(getattr(mc, "architectures", None) or getattr(mc.hf_config, "architectures", None) or [])
    arch = archs[0] if archs else architectures.architecture_of(mc.hf_config)
    spec = vllm_config.speculative_config
    draft = getattr(spec, "draft_model_config", None)
    ids = getattr(getattr(draft, "hf_config", None), "eagle_aux_hidden_state_layer_ids", None)
    architectures.check_vllm_capture(arch, mc.hf_config, settings.hook_points, ids)


def wait_for_catalog(fetch: Callable[[float], Catalog], target: str, timeout: float) -> Catalog:
    """``fetch(per_try_timeout)`` retried until ``timeout`` s: a pod's containers start in any order."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fetch(max(1.0, min(10.0, deadline - time.monotonic())))
        except (ClientError, TimeoutError) as exc:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"safety monitor: sidecar {target} did not answer GetDetectors within {timeout:.0f} s "
                    f"(connect_timeout): {exc}"
                ) from None
            time.sleep(0.5)
