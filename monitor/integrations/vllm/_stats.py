"""The adapter's counters as vLLM KV-connector stats, exported by vLLM's own Prometheus endpoint.

Each step the worker (and the scheduler) hand vLLM what changed since the last step
(``MonitorStats``); vLLM aggregates it across workers and, in the process that serves
``/metrics``, passes it to ``MonitorPromMetrics.observe``, which increments counters named
``vllm:safety_monitor_*`` beside vLLM's own. Coverage is
``requests_monitored / (requests_monitored + requests_unmonitored)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics, KVConnectorStats

# Plain counters: name -> help. Counters by reason: name -> (help, label).
COUNTERS = {
    "requests_opened": "Requests the adapter started to monitor.",
    "requests_monitored": "Requests whose final verdict came back from the sidecar.",
    "rows_sent": "Activation rows the sidecar acknowledged.",
    "halts": "Requests the sidecar advised to halt.",
    "halts_applied": "Halts the scheduler applied (the request was still running).",
    "tokens_withheld": "Generated tokens never shown to the client: held (hold_back_tokens) when HALT came.",
}
BY_REASON = {
    "requests_unmonitored": "Requests left without a final verdict, by reason.",
    "rows_dropped": "Activation rows dropped instead of sent, by reason.",
    "modes_refused": "Engine configurations the adapter refused to read rows under (monitoring off), by mode.",
}


@dataclass
class MonitorStats(KVConnectorStats):
    """Increments since the last step: plain counts, and ``{reason: count}`` maps (serialisable)."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data: dict[str, Any] = {**{k: 0 for k in COUNTERS}, **{k: {} for k in BY_REASON}}

    def add(self, name: str, n: int = 1, reason: str | None = None) -> None:
        if n <= 0:
            return
        if reason is None:
            self.data[name] = self.data.get(name, 0) + n
        else:
            per = self.data.setdefault(name, {})
            per[reason] = per.get(reason, 0) + n

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            if isinstance(v, dict):
                for reason, n in v.items():
                    self.add(k, int(n), reason)
            else:
                self.add(k, int(v))
        return self

    def reduce(self) -> dict[str, int | float]:
        out: dict[str, int | float] = {}
        for k, v in self.data.items():
            if isinstance(v, dict):
                out.update({f"{k}[{r}]": n for r, n in sorted(v.items())})
            else:
                out[k] = v
        return out

    def is_empty(self) -> bool:
        return not any(v for v in self.data.values())


class MonitorPromMetrics(KVConnectorPromMetrics):
    """``vllm:safety_monitor_<counter>_total`` per engine (and per reason where it has one)."""

    def __init__(
        self,
        vllm_config: Any,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self._plain = {
            k: self._counter_cls(name=f"vllm:safety_monitor_{k}", documentation=doc, labelnames=labelnames)
            for k, doc in COUNTERS.items()
        }
        self._by_reason = {
            k: self._counter_cls(name=f"vllm:safety_monitor_{k}", documentation=doc, labelnames=[*labelnames, "reason"])
            for k, doc in BY_REASON.items()
        }

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        labels = self.per_engine_labelvalues.get(engine_idx, [])
        for k, v in transfer_stats_data.items():
            if k in self._plain and v:
                self._plain[k].labels(*labels).inc(v)
            elif k in self._by_reason and isinstance(v, dict):
                for reason, n in v.items():
                    if n:
                        self._by_reason[k].labels(*labels, reason).inc(n)
