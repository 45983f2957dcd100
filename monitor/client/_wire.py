"""Client-side conversion between the dataclasses in ``_types`` and the wire messages."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from monitor._proto import monitor_pb2 as pb
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
from monitor.tensors import WireTensor, decode, encode


def blocks(activations: Mapping[str, Any], projected: bool = False) -> list[pb.ActivationBlock]:
    out = []
    for hook, arr in activations.items():
        t = encode(arr)
        out.append(
            pb.ActivationBlock(
                hook_point=hook,
                activations=pb.Tensor(shape=list(t.shape), dtype=pb.DType.Name(t.dtype), data=t.data),
                projected=projected,
            )
        )
    return out


def request(gen: Generation) -> pb.ScoreRequest:
    return pb.ScoreRequest(
        request_id=gen.request_id,
        model=gen.model,
        prompt=gen.prompt,
        output=gen.output,
        activations=blocks(gen.activations, gen.projected),
        labels=dict(gen.labels),
        decision=blocks(gen.decision, gen.projected),
        traceparent=gen.traceparent,
    )


def requests(generations: Iterable[Generation]) -> tuple[list[pb.ScoreRequest], list[tuple[str, Exception]]]:
    """Encode a batch item by item: (the messages, (request_id, error) of the items that failed).

    One generation the client cannot encode (a lone surrogate in its text, an object array)
    must cost that item only, never the batch it travels with.
    """
    good: list[pb.ScoreRequest] = []
    bad: list[tuple[str, Exception]] = []
    for g in generations:
        try:
            good.append(request(g))
        except Exception as exc:  # whatever the caller's objects raise while being encoded
            bad.append((str(getattr(g, "request_id", "?"))[:128], exc))
    return good, bad


def _hook_stats(items: Iterable[pb.HookStats]) -> tuple[HookStats, ...]:
    return tuple(HookStats(h.hook_point, h.tokens, h.mean_l2_norm, h.max_l2_norm) for h in items)


def _detectors(items: Iterable[pb.DetectorScore]) -> tuple[DetectorVerdict, ...]:
    return tuple(
        DetectorVerdict(
            detector=d.detector,
            behaviour=d.behaviour,
            score=d.score,
            probability=d.probability,
            threshold=d.threshold,
            fired=d.fired,
            severity=pb.Severity.Name(d.severity).removeprefix("SEVERITY_").lower(),
            top_features=tuple(
                FeatureInfo(f.latent, f.activation, f.contribution, f.label, f.example) for f in d.top_features
            ),
            recent_score=d.recent_score,
            critical=d.critical,
        )
        for d in items
    )


def score_reply(r: pb.ScoreResponse) -> ScoreReply:
    return ScoreReply(
        request_id=r.request_id,
        hook_stats=_hook_stats(r.hook_stats),
        text_stats=dict(r.text_stats),
        detectors=_detectors(r.detectors),
        flagged=r.flagged,
        server_seconds=r.server_seconds,
    )


def chunk_verdict(v: pb.Verdict) -> ChunkVerdict:
    return ChunkVerdict(
        request_id=v.request_id,
        chunk_index=v.chunk_index,
        tokens_seen=v.tokens_seen,
        hook_stats=_hook_stats(v.hook_stats),
        text_stats=dict(v.text_stats),
        detectors=_detectors(v.detectors),
        halt=v.advice == pb.ADVICE_HALT,
        reason=v.reason,
        final=v.final,
    )


def ingest_report(s: pb.IngestSummary) -> IngestReport:
    return IngestReport(
        received=s.received,
        accepted=s.accepted,
        rejected=s.rejected,
        flagged=s.flagged,
        errors=tuple((e.index, e.request_id, e.message) for e in s.errors),
    )


def catalog(c: pb.DetectorCatalog) -> Catalog:
    return Catalog(
        model=c.model,
        bundle_name=c.bundle_name,
        bundle_version=c.bundle_version,
        hook_points=tuple(HookPointInfo(h.name, h.d_model, h.max_tokens, _slice_of(h)) for h in c.hook_points),
        detectors=tuple(d.name for d in c.detectors),
        detector_infos=tuple(
            DetectorInfo(
                d.name,
                d.behaviour,
                d.kind,
                d.hook_point,
                d.threshold,
                d.critical,
                d.aggregation,
                d.target_fpr,
                tuple(d.latent_ids),
            )
            for d in c.detectors
        ),
    )


def _slice_of(h: pb.HookPointSpec) -> EncoderSlice | None:
    return _slice(h.encoder_slice) if h.HasField("encoder_slice") else None


def _slice(e: pb.EncoderSlice) -> EncoderSlice:
    def arr(t: pb.Tensor) -> Any:
        return decode(WireTensor(tuple(t.shape), int(t.dtype), t.data), "encoder_slice")

    w, b = np.array(arr(e.w_enc)), np.array(arr(e.b_enc))  # writable copies (torch wants them)
    if e.apply_b_dec_to_input:
        b = b - arr(e.b_dec) @ w
    return EncoderSlice(tuple(e.latent_ids), w, b, int(e.dense_columns))


def chunk(
    *,
    request_id: str,
    model: str,
    prompt: str,
    labels: Mapping[str, str],
    first: bool,
    text_delta: str,
    activations: Mapping[str, Any],
    final: bool,
    projected: bool = False,
    decision: Mapping[str, Any] | None = None,
    traceparent: str = "",
) -> pb.ScoreChunk:
    msg = pb.ScoreChunk(
        request_id=request_id,
        text_delta=text_delta,
        activations=blocks(activations, projected),
        final=final,
        decision=blocks(decision or {}, projected),
    )
    if first:
        msg.model = model
        msg.prompt = prompt
        msg.labels.update(labels)
        msg.traceparent = traceparent
    return msg


@dataclass(frozen=True)
class TlsSettings:
    """How a client reaches a TLS sidecar: the CA that signed the server's certificate (None:
    the system roots) and, for mutual TLS, the client's own certificate chain and key (PEM files)."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise ValueError("tls_cert / tls_key: expected both (a client certificate and its key) or neither")

        def read(path: str | None, name: str) -> bytes | None:
            if not path:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"{name}: cannot read PEM file {path!r}: {exc.strerror}") from None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.ca, "tls_ca"),
            private_key=read(self.key, "tls_key"),
            certificate_chain=read(self.cert, "tls_cert"),
        )


def channel_options(max_message_bytes: int, max_backoff_s: float) -> list[tuple[str, int]]:
    """Fast reconnects (100 ms doubling up to ``max_backoff_s``) and large messages."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", int(max_backoff_s * 1000)),
    ]
