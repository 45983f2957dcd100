"""Wire messages <-> pipeline objects. Pure functions; the servicer stays thin."""

from __future__ import annotations

from collections.abc import Iterable

from monitor._proto import monitor_pb2 as pb
from monitor.detectors import Bundle
from monitor.pipeline import (
    ActivationInput,
    ChunkInput,
    HookStats,
    Limits,
    ScoreInput,
    ScoreResult,
    StreamVerdict,
)
from monitor.tensors import DType, WireTensor


def _blocks(blocks: Iterable[pb.ActivationBlock]) -> list[ActivationInput]:
    return [
        ActivationInput(
            hook_point=b.hook_point,
            tensor=WireTensor(
                shape=tuple(b.activations.shape), dtype=int(b.activations.dtype), data=b.activations.data
            ),
            projected=b.projected,
        )
        for b in blocks
    ]


def score_input(req: pb.ScoreRequest) -> ScoreInput:
    return ScoreInput(
        request_id=req.request_id,
        model=req.model,
        prompt=req.prompt,
        output=req.output,
        activations=_blocks(req.activations),
        labels=dict(req.labels),
    )


def chunk_input(chunk: pb.ScoreChunk) -> ChunkInput:
    return ChunkInput(
        request_id=chunk.request_id,
        model=chunk.model,
        prompt=chunk.prompt,
        text_delta=chunk.text_delta,
        activations=_blocks(chunk.activations),
        labels=dict(chunk.labels),
        final=chunk.final,
    )


def _hook_stats(stats: Iterable[HookStats]) -> list[pb.HookStats]:
    return [
        pb.HookStats(hook_point=s.hook_point, tokens=s.tokens, mean_l2_norm=s.mean_l2_norm, max_l2_norm=s.max_l2_norm)
        for s in stats
    ]


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=result.request_id,
        hook_stats=_hook_stats(result.hook_stats),
        text_stats=dict(result.text_stats),
        flagged=result.flagged,
        server_seconds=result.seconds,
    )


def verdict(v: StreamVerdict) -> pb.Verdict:
    return pb.Verdict(
        request_id=v.request_id,
        chunk_index=v.chunk_index,
        tokens_seen=v.tokens_seen,
        hook_stats=_hook_stats(v.hook_stats),
        text_stats=dict(v.text_stats),
        advice=pb.ADVICE_HALT if v.halt else pb.ADVICE_CONTINUE,
        reason=v.reason,
        final=v.final,
    )


def catalog(bundle: Bundle, limits: Limits) -> pb.DetectorCatalog:
    dtypes = [pb.DType.Name(int(d)) for d in DType]
    return pb.DetectorCatalog(
        model=bundle.model,
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        hook_points=[
            pb.HookPointSpec(name=hp.name, d_model=hp.d_model, max_tokens=limits.max_tokens, accepted_dtypes=dtypes)
            for hp in bundle.hook_points
        ],
    )
