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
    blocks: dict[str, list[int]] = field(default_factory=dict)  # req -> hidden-state block ids to append
    replaced: set[str] = field(default_factory=set)  # resumed after preemption: blocks replace the old ones
    reads: list[ReadSpan] = field(default_factory=list)
    finished: dict[str, list[int]] = field(default_factory=dict)  # req -> output token ids


@dataclass
class HaltReport(KVConnectorWorkerMetadata):
    """Worker -> scheduler, once per step: requests the sidecar advised to halt."""

    halted: dict[str, str] = field(default_factory=dict)  # engine request id -> reason

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, HaltReport):
            self.halted.update(other.halted)
        return self
