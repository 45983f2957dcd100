"""Client library for inference servers: send generations and activations to the sidecar.

``MonitorClient`` (threads) and ``AsyncMonitorClient`` (asyncio) share names and behaviour;
``submit()`` never blocks the caller and counts what it had to drop.
"""

from monitor.client._async import AsyncMonitorClient, AsyncScoreStream
from monitor.client._errors import ClientError, InvalidRequest, ServerBusy, Unauthenticated, Unavailable
from monitor.client._sync import MonitorClient, ScoreStream
from monitor.client._transformers import GenerationMonitor, MonitoredGeneration
from monitor.client._types import (
    Catalog,
    ChunkVerdict,
    DetectorInfo,
    DetectorVerdict,
    EncoderSlice,
    FeatureInfo,
    Generation,
    HookPointInfo,
    HookStats,
    IngestReport,
    ScoreReply,
)

__all__ = [
    "AsyncMonitorClient",
    "AsyncScoreStream",
    "Catalog",
    "ChunkVerdict",
    "ClientError",
    "DetectorInfo",
    "DetectorVerdict",
    "EncoderSlice",
    "FeatureInfo",
    "Generation",
    "GenerationMonitor",
    "HookPointInfo",
    "HookStats",
    "IngestReport",
    "InvalidRequest",
    "MonitorClient",
    "MonitoredGeneration",
    "ScoreReply",
    "ScoreStream",
    "ServerBusy",
    "Unauthenticated",
    "Unavailable",
]
