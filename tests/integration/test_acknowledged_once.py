"""Each generation counts once in drift and the audit log, however the client retries; a HALT is
audited when it is decided, whether or not the stream ever sends its final chunk.

The sidecar runs as a real `monitor serve` process. A failed audit write is a real one: the
process's file-size limit (RLIMIT_FSIZE, set from outside with prlimit) is lowered to the audit
file's current size, so the next write fails with EFBIG as it would on a full disk, and raised
again for the retry.
"""

from __future__ import annotations

import json
import resource
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from tests.conftest import D_MODEL, HOOK, MODEL, ServeProcess, always_firing_bundle

UNLIMITED = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def tensor(x: np.ndarray) -> pb.Tensor:
    return pb.Tensor(shape=list(x.shape), dtype=pb.DTYPE_F32, data=x.tobytes())


def item(rid: str, words: int = 5) -> pb.ScoreRequest:
    x = np.random.default_rng(0).normal(size=(4, D_MODEL)).astype(np.float32)
    output = " ".join(["fine"] * words) + "."
    block = pb.ActivationBlock(hook_point=HOOK, activations=tensor(x))
    return pb.ScoreRequest(request_id=rid, model=MODEL, output=output, activations=[block])


def drift_events(server: ServeProcess) -> float:
    """Generations the drift engine has counted (all still in its reference sample here)."""
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "safety_monitor_drift_reference_events" and s.labels.get("metric") == "text.words":
                return s.value
    return 0.0


def audit_records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generation_ids(path: Path) -> list[str]:
    """Request ids of generation records (not halts, critiques or drift events), in file order."""
    return [str(r["request_id"]) for r in audit_records(path) if "type" not in r]


def fail_writes(server: ServeProcess, path: Path) -> None:
    """From now on every write past the audit file's current end fails (EFBIG), like a full disk."""
    size = path.stat().st_size
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (size, resource.RLIM_INFINITY))


def allow_writes(server: ServeProcess) -> None:
    resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, UNLIMITED)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    audit = tmp_path / "audit.jsonl"
    server = ServeProcess("--audit-log", str(audit)).wait()
    try:
        yield server, audit
    finally:
        server.stop()


def test_a_score_retried_after_unavailable_counts_once_in_drift(served: tuple[ServeProcess, Path]) -> None:
    server, audit = served
    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.SafetyMonitorStub(ch)
        stub.Score(item("first"), timeout=30)
        assert drift_events(server) == 1
        fail_writes(server, audit)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(item("retried"), timeout=30)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # not acknowledged, so not counted: the retry is the generation's only count
        assert drift_events(server) == 1
        allow_writes(server)
        stub.Score(item("retried"), timeout=30)
        assert drift_events(server) == 2
        stub.Score(item("retried"), timeout=30)  # a retry of an acknowledged reply (a lost response)
        assert drift_events(server) == 2
    assert generation_ids(audit) == ["first", "retried"]


def test_an_ingest_retried_after_unavailable_does_not_count_its_audited_batch_twice(
    served: tuple[ServeProcess, Path],
) -> None:
    server, audit = served
    ids = [f"bulk-{i}" for i in range(74)]  # one batch of 64 (audited), then 10 whose write fails

    def first_try() -> Iterator[pb.ScoreRequest]:
        for rid in ids[:64]:
            yield item(rid)
        deadline = time.monotonic() + 60
        while len(generation_ids(audit)) < 64:  # the first batch is on disk
            assert time.monotonic() < deadline, "the first Ingest batch never reached the audit log"
            time.sleep(0.05)
        fail_writes(server, audit)
        for rid in ids[64:]:
            yield item(rid)

    with grpc.insecure_channel(server.target) as ch:
        stub = pb_grpc.SafetyMonitorStub(ch)
        with pytest.raises(grpc.RpcError) as err:
            stub.Ingest(first_try(), timeout=120)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert drift_events(server) == 64  # the durable batch counts; the failed one does not
        allow_writes(server)
        summary = stub.Ingest(iter([item(rid) for rid in ids]), timeout=120)
    assert (summary.received, summary.accepted, summary.rejected) == (74, 74, 0)
    assert drift_events(server) == 74
    assert generation_ids(audit) == ids  # each generation once, in order


def halting_chunks(rid: str, then_final: bool) -> Iterator[pb.ScoreChunk]:
    """A stream the always-firing bundle halts on its first chunk (12 tokens >= halt_min_tokens)."""
    x = np.ones((12, D_MODEL), np.float32)
    yield pb.ScoreChunk(
        request_id=rid,
        model=MODEL,
        prompt="How do I do something harmful?",
        text_delta="Sure, here is how ",
        activations=[pb.ActivationBlock(hook_point=HOOK, activations=tensor(x))],
        decision=[pb.ActivationBlock(hook_point=HOOK, activations=tensor(x[:1]))],
    )
    if then_final:
        for final in (False, True):
            yield pb.ScoreChunk(
                text_delta="more ",
                activations=[pb.ActivationBlock(hook_point=HOOK, activations=tensor(x))],
                final=final,
            )


def halts(path: Path, rid: str) -> list[dict[str, object]]:
    return [r for r in audit_records(path) if r.get("type") == "halt" and r["request_id"] == rid]


def wait_for_halt(path: Path, rid: str, timeout: float = 10) -> list[dict[str, object]]:
    deadline = time.monotonic() + timeout
    while not (found := halts(path, rid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


@pytest.fixture
def halting(tmp_path: Path) -> Iterator[tuple[ServeProcess, Path]]:
    audit = tmp_path / "audit.jsonl"
    bundle = always_firing_bundle(tmp_path)
    server = ServeProcess(
        "--audit-log", str(audit), "--bundle", str(bundle), env={"SAFETY_MONITOR_STREAM_IDLE_SECONDS": "1"}
    ).wait()
    try:
        yield server, audit
    finally:
        server.stop()


def test_a_halt_is_audited_when_the_client_cancels_before_the_final_chunk(
    halting: tuple[ServeProcess, Path],
) -> None:
    server, audit = halting
    with grpc.insecure_channel(server.target) as ch:
        stream = pb_grpc.SafetyMonitorStub(ch).ScoreStream(halting_chunks("cancelled", then_final=False), timeout=30)
        first = next(stream)
        assert first.advice == pb.ADVICE_HALT
        stream.cancel()  # the engine stopped the request (or crashed): no final chunk ever comes
    (record,) = wait_for_halt(audit, "cancelled")
    assert record["rpc"] == "ScoreStream" and record["chunk_index"] == 0 and record["tokens_seen"] == 12
    assert record["halt_reason"] == first.reason and "fired" in str(record["halt_reason"])
    assert generation_ids(audit) == []  # the generation never finished: no generation record


def test_a_halt_is_audited_when_the_stream_goes_idle_after_it(halting: tuple[ServeProcess, Path]) -> None:
    server, audit = halting

    def silent_after_first() -> Iterator[pb.ScoreChunk]:
        yield from halting_chunks("idle", then_final=False)
        time.sleep(3)  # longer than stream_idle_seconds: the server ends the stream

    with grpc.insecure_channel(server.target) as ch:
        stream = pb_grpc.SafetyMonitorStub(ch).ScoreStream(silent_after_first(), timeout=30)
        assert next(stream).advice == pb.ADVICE_HALT
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert [r["chunk_index"] for r in wait_for_halt(audit, "idle")] == [0]


def test_a_finished_halted_stream_has_one_halt_record_and_one_generation_record(
    halting: tuple[ServeProcess, Path],
) -> None:
    server, audit = halting
    with grpc.insecure_channel(server.target) as ch:
        verdicts = list(pb_grpc.SafetyMonitorStub(ch).ScoreStream(halting_chunks("done", then_final=True), timeout=30))
    assert [v.advice == pb.ADVICE_HALT for v in verdicts] == [True, True, True] and verdicts[-1].final
    assert [r["chunk_index"] for r in halts(audit, "done")] == [0]  # decided once, audited once
    (generation,) = [r for r in audit_records(audit) if "type" not in r]
    assert generation["request_id"] == "done" and generation["halted"] is True
