import numpy as np
import pytest

from monitor.detectors import Bundle
from monitor.errors import InvalidInput
from monitor.pipeline import ActivationInput, ChunkInput, Limits, Pipeline, ScoreInput
from monitor.tensors import encode

HOOK = "blocks.16.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline(Bundle.load(), Limits(max_tokens=16, max_stream_tokens=20))


def req(arr: np.ndarray, **kw: object) -> ScoreInput:
    base: dict = {
        "request_id": "r",
        "model": MODEL,
        "output": "a b c",
        "activations": [ActivationInput(HOOK, encode(arr))],
    }
    base.update(kw)
    return ScoreInput(**base)


def test_stats_match_numpy(pipeline: Pipeline) -> None:
    x = np.random.default_rng(0).normal(size=(9, 576)).astype(np.float32)
    r = pipeline.score(req(x))
    norms = np.linalg.norm(x, axis=1)
    assert r.hook_stats[0].tokens == 9
    assert r.hook_stats[0].mean_l2_norm == pytest.approx(norms.mean(), rel=1e-6)
    assert r.hook_stats[0].max_l2_norm == pytest.approx(norms.max(), rel=1e-6)
    assert r.text_stats["words"] == 3 and r.bytes_received == 9 * 576 * 4


@pytest.mark.parametrize(
    ("kw", "field", "reason"),
    [
        ({"request_id": ""}, "request_id", "request_id"),
        ({"model": "gpt-2"}, "model", "model"),
        ({"labels": {"Bad-Key": "x"}}, "labels[", "labels"),
        ({"labels": {f"k{i}": "v" for i in range(9)}}, "labels", "labels"),
        ({"activations": []}, "activations", "missing"),
    ],
)
def test_identity_errors(pipeline: Pipeline, kw: dict, field: str, reason: str) -> None:
    with pytest.raises(InvalidInput) as e:
        pipeline.score(req(np.zeros((1, 576), np.float32), **kw))
    assert str(e.value).startswith(field) and e.value.reason == reason


def test_shape_errors(pipeline: Pipeline) -> None:
    with pytest.raises(InvalidInput, match=r"activations\[0\].activations.shape: expected rank 2"):
        pipeline.score(req(np.zeros((2, 3, 576), np.float32)))
    with pytest.raises(InvalidInput, match=r"shape\[1\] \(d_model\): expected 576 .* got 512"):
        pipeline.score(req(np.zeros((2, 512), np.float32)))
    with pytest.raises(InvalidInput, match=r"shape\[0\] \(tokens\): expected at most 16, got 17"):
        pipeline.score(req(np.zeros((17, 576), np.float32)))
    with pytest.raises(InvalidInput, match=r"hook_point: expected one of \[blocks.16.hook_resid_post\]"):
        pipeline.score(
            req(np.zeros((1, 576), np.float32), activations=[ActivationInput("blocks.3", encode(np.zeros((1, 576))))])
        )


def test_stream_accumulates_and_bounds_tokens(pipeline: Pipeline) -> None:
    rng = np.random.default_rng(1)
    chunks = [rng.normal(size=(n, 576)).astype(np.float32) for n in (4, 6, 3)]
    s = pipeline.open_stream()
    v = s.update(ChunkInput("s1", MODEL, "p", "Hello", [ActivationInput(HOOK, encode(chunks[0]))]))
    assert v.chunk_index == 0 and v.tokens_seen == 4 and not v.final
    s.update(ChunkInput(text_delta=" wide", activations=[ActivationInput(HOOK, encode(chunks[1]))]))
    v = s.update(ChunkInput(text_delta=" world", activations=[ActivationInput(HOOK, encode(chunks[2]))], final=True))
    allrows = np.concatenate(chunks)
    assert v.tokens_seen == 13 and v.final and v.text_stats["words"] == 3
    assert v.hook_stats[0].mean_l2_norm == pytest.approx(np.linalg.norm(allrows, axis=1).mean(), rel=1e-6)
    with pytest.raises(InvalidInput, match="final"):
        s.update(ChunkInput(text_delta="more"))
    s2 = pipeline.open_stream()
    s2.update(ChunkInput("s2", MODEL, activations=[ActivationInput(HOOK, encode(np.ones((15, 576))))]))
    with pytest.raises(InvalidInput, match=r"at most 20 tokens per stream \(5 left\)"):
        s2.update(ChunkInput(activations=[ActivationInput(HOOK, encode(np.ones((6, 576))))]))
