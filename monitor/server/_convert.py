"""Wire messages <-> pipeline objects. Pure functions; the servicer stays thin."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from monitor._proto import monitor_pb2 as pb
from monitor.detectors import Bundle, DetectorResult, DetectorSet
from monitor.pipeline import (
    ActivationInput,
    ChunkInput,
    HookStats,
    Limits,
    ScoreInput,
    ScoreResult,
    StreamVerdict,
)
from monitor.tensors import DType, WireTensor, encode


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
        decision=_blocks(req.decision),
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
        decision=_blocks(chunk.decision),
    )


def _hook_stats(stats: Iterable[HookStats]) -> list[pb.HookStats]:
    return [
        pb.HookStats(hook_point=s.hook_point, tokens=s.tokens, mean_l2_norm=s.mean_l2_norm, max_l2_norm=s.max_l2_norm)
        for s in stats
    ]


def _severity(r: DetectorResult) -> int:
    if not r.fired:
        return int(pb.SEVERITY_INFO)
    return int(pb.SEVERITY_CRITICAL if r.critical else pb.SEVERITY_WARNING)


def detector_scores(results: Iterable[DetectorResult]) -> list[pb.DetectorScore]:
    return [
        pb.DetectorScore(
            detector=r.name,
            behaviour=r.behaviour,
            score=r.score,
            probability=r.probability,
            threshold=r.threshold,
            fired=r.fired,
            severity=_severity(r),  # type: ignore[arg-type]
            top_features=[
                pb.FeatureContribution(
                    latent=f.latent,
                    activation=f.activation,
                    contribution=f.contribution,
                    label=f.label,
                    example=f.example,
                )
                for f in r.top_features
            ],
            recent_score=r.recent_score,
            critical=r.critical,
        )
        for r in results
    ]


def score_response(result: ScoreResult) -> pb.ScoreResponse:
    return pb.ScoreResponse(
        request_id=result.request_id,
        hook_stats=_hook_stats(result.hook_stats),
        text_stats=dict(result.text_stats),
        detectors=detector_scores(result.detectors),
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
        detectors=detector_scores(v.detectors),
        advice=pb.ADVICE_HALT if v.halt else pb.ADVICE_CONTINUE,
        reason=v.reason,
        final=v.final,
    )


def _encoder_slice(detectors: DetectorSet, hook_point: str) -> pb.EncoderSlice | None:
    """The projection a projected-mode client applies: ``x @ w_enc + b_enc`` per token (b_dec folded in)."""
    proj = detectors.projection(hook_point)
    if proj is None:
        return None
    return pb.EncoderSlice(
        latent_ids=[int(i) for i in proj.latent_ids],
        w_enc=_tensor(proj.w),
        b_enc=_tensor(proj.b),
        b_dec=_tensor(np.zeros(proj.w.shape[0], dtype=np.float32)),
        apply_b_dec_to_input=False,
        dense_columns=proj.width - proj.n_latents,
    )


def _tensor(a: np.ndarray) -> pb.Tensor:
    t = encode(a)
    return pb.Tensor(shape=list(t.shape), dtype=t.dtype, data=t.data)  # type: ignore[arg-type]


def catalog(bundle: Bundle, limits: Limits, detectors: DetectorSet) -> pb.DetectorCatalog:
    dtypes = [pb.DType.Name(int(d)) for d in DType]
    infos = []
    for s in detectors.specs:
        if s.component:
            continue  # read by a stack, never reported on its own
        lat = [int(i) for i in detectors.detector(s.name).latent_ids] if s.kind != "stack" else []
        infos.append(
            pb.DetectorInfo(
                name=s.name,
                behaviour=s.behaviour,
                kind=s.kind,
                hook_point=s.hook_point,
                threshold=s.threshold,
                critical=s.critical,
                aggregation=s.aggregation,
                target_fpr=s.target_fpr,
                latent_ids=lat,
            )
        )
    return pb.DetectorCatalog(
        model=bundle.model,
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        hook_points=[
            pb.HookPointSpec(
                name=hp.name,
                d_model=hp.d_model,
                max_tokens=limits.max_tokens,
                accepted_dtypes=dtypes,
                encoder_slice=_encoder_slice(detectors, hp.name),
            )
            for hp in bundle.hook_points
        ],
        detectors=infos,
    )
