"""Run the safety monitor beside vLLM: every generated token's activations, streamed per step.

Install ``safety-monitor`` into vLLM's environment (it needs only grpcio, protobuf and numpy) and
point it at the sidecar::

    SAFETY_MONITOR_SIDECAR=127.0.0.1:50051 vllm serve <model>

vLLM loads the plugin (``register``), which adds ``extract_hidden_states`` capture and the
``SafetyMonitorConnector`` to the engine. For ``LLM(...)`` in Python, either set the same env or
pass the arguments explicitly: ``LLM(model, **engine_config(AdapterSettings(sidecar, hook_points)))``.
See docs/vllm.md for what is captured, HALT, and the costs measured.
"""

from monitor.integrations.vllm._plugin import CONTENT_FILTER, register, resolve_settings
from monitor.integrations.vllm._settings import HALT_STOP_REASON, AdapterSettings, engine_config, vllm_layer_ids

__all__ = [
    "CONTENT_FILTER",
    "HALT_STOP_REASON",
    "AdapterSettings",
    "engine_config",
    "register",
    "resolve_settings",
    "vllm_layer_ids",
]
