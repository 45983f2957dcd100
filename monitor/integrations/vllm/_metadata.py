"""What the connector's two roles tell each other once per step (vLLM ships these between processes)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass
class ReadSpan:
    """Positions ``[start, end)`` of one request whose rows became final this step."""

    req_id: str
    start: int
    end: int


@dataclass
class StepMetadata(KVConnectorMetadata):
    """Scheduler -> worker, once per step. Every map is keyed by the engine's request id (unique
    per request, unlike the client's id, which two requests may share)."""

    opened: dict[str, list[int]] = field(default_factory=dict)  # req -> prompt token ids
    traces: dict[str, str] = field(default_factory=dict)  # opened req -> its W3C traceparent (when it had one)
    blocks: dict[str, list[int]] = field(default_factory=dict)  # req -> hidden-state block ids to append
    replaced: set[str] = field(default_factory=set)  # resumed after preemption: blocks replace the old ones
    reads: list[ReadSpan] = field(default_factory=list)
    finished: dict[str, list[int]] = field(default_factory=dict)  # req -> output token ids


@dataclass
class WorkerReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: requests the sidecar advised to halt and, for
    withholding (``hold_back_tokens``), how far the verdicts without HALT reach."""

    halted: dict[str, str] = field(default_factory=dict)  # engine request id -> reason
    covered: dict[str, int] = field(default_factory=dict)  # request -> output tokens a verdict covers
    done: set[str] = field(default_factory=set)  # requests whose last verdict came (or never will)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, WorkerReport):
            self.halted.update(other.halted)
            for rid, n in other.covered.items():
                self.covered[rid] = max(n, self.covered.get(rid, -1))
            self.done |= other.done
        return self

    def __bool__(self) -> bool:
        return bool(self.halted or self.covered or self.done)
