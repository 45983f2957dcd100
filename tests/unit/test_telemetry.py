"""Trace context parsing, the evaluation events' shape, and the pinned semantic-convention names."""

from __future__ import annotations

import pytest

from monitor.detectors import Contribution, DetectorResult
from monitor.errors import ConfigError
from monitor.pipeline import ScoreResult, StreamVerdict
from monitor.telemetry import TraceContext, check_endpoint, evaluation_events, parse_traceparent, trace_from_metadata
from monitor.telemetry import _events as ev

T, S = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (f"00-{T}-{S}-01", TraceContext(T, S, 1)),
        (f"00-{T}-{S}-00", TraceContext(T, S, 0)),
        (f"01-{T}-{S}-01-future", TraceContext(T, S, 1)),  # a later version may append fields
        (f"00-{T}-{S}-01-extra", None),  # version 00 has exactly four
        (f"ff-{T}-{S}-01", None),  # version ff is invalid
        (f"00-{'0' * 32}-{S}-01", None),
        (f"00-{T}-{'0' * 16}-01", None),
        (f"00-{T.upper()}-{S}-01", None),  # lowercase hex only
        (f"00-{T[:-1]}-{S}-01", None),
        ("", None),
        (None, None),
        ("x" * 600, None),
    ],
)
def test_traceparent_follows_w3c(value: str | None, expected: TraceContext | None) -> None:
    assert parse_traceparent(value) == expected


def test_trace_from_metadata_reports_a_malformed_value() -> None:
    assert trace_from_metadata([("authorization", "x"), ("traceparent", f"00-{T}-{S}-01")]) == (
        TraceContext(T, S, 1),
        False,
    )
    assert trace_from_metadata([("traceparent", b"garbage")]) == (None, True)
    assert trace_from_metadata(None) == (None, False)
    assert TraceContext(T, S, 1).traceparent == f"00-{T}-{S}-01"
    assert TraceContext(T, S).exemplar == {"trace_id": T, "span_id": S}


def test_pinned_attribute_names_equal_the_installed_semantic_conventions() -> None:
    semconv = pytest.importorskip("opentelemetry.semconv._incubating.attributes.gen_ai_attributes")
    schemas = pytest.importorskip("opentelemetry.semconv.schemas")
    assert ev.NAME == semconv.GEN_AI_EVALUATION_NAME
    assert ev.SCORE_VALUE == semconv.GEN_AI_EVALUATION_SCORE_VALUE
    assert ev.SCORE_LABEL == semconv.GEN_AI_EVALUATION_SCORE_LABEL
    assert ev.EXPLANATION == semconv.GEN_AI_EVALUATION_EXPLANATION
    assert ev.RESPONSE_ID == semconv.GEN_AI_RESPONSE_ID
    assert ev.REQUEST_MODEL == semconv.GEN_AI_REQUEST_MODEL
    assert ev.SCHEMA_URL in {s.value for s in schemas.Schemas}


def detector(name: str, fired: bool, critical: bool, features: tuple[Contribution, ...] = ()) -> DetectorResult:
    return DetectorResult(name, "b", "sae_probe", 1.5, 1.0, 0.8, 0.5, fired, critical, features, tokens=10)


def test_events_per_detector_halt_and_debate() -> None:
    trace = TraceContext(T, S, 1)
    feats = (Contribution(7, 1.0, 0.25, "refusal phrasing", ""), Contribution(9, 0.5, -0.1, "lists", ""))
    result = ScoreResult(
        "r1", "m", (), {}, True, 0.01, 10, (detector("a", True, True, feats), detector("b", False, False))
    )
    a, b = evaluation_events("Score", result, trace)
    assert a.name == ev.EVALUATION_RESULT and a.severity == "WARN" and a.trace == trace
    assert (
        a.attributes[ev.NAME] == "a" and a.attributes[ev.SCORE_VALUE] == 0.8 and a.attributes[ev.SCORE_LABEL] == "fired"
    )
    assert a.attributes[ev.EXPLANATION] == "latent 7 'refusal phrasing' +0.250; latent 9 'lists' -0.100"
    assert b.severity == "INFO" and b.attributes[ev.SCORE_LABEL] == "not_fired" and ev.EXPLANATION not in b.attributes
    verdict = StreamVerdict(
        "r2", "m", 3, 12, {}, 0, (), {}, True, "a fired", False, 0.0, (detector("a", True, True),), halted_now=True
    )
    halt = ev.halt_event("ScoreStream", verdict, None)
    assert halt.attributes[ev.NAME] == ev.HALT_NAME and halt.attributes[ev.SCORE_LABEL] == "halt"
    assert halt.attributes["safety_monitor.detectors"] == "a" and halt.attributes["safety_monitor.tokens_seen"] == 12
    debate = ev.debate_event(
        {
            "type": "debate",
            "request_id": "r3",
            "detectors": {"a": 1.0},
            "outcome": "ok",
            "verdict": "unsafe",
            "judge_confidence": 0.75,
        },
        trace,
    )
    assert (
        debate is not None
        and debate.attributes[ev.SCORE_LABEL] == "unsafe"
        and debate.attributes[ev.SCORE_VALUE] == 0.75
    )
    failed = ev.debate_event({"type": "debate", "request_id": "r3", "outcome": "timeout"}, None)
    assert failed is not None and failed.attributes[ev.ERROR_TYPE] == "timeout"
    assert ev.debate_event({"type": "critique"}, None) is None


@pytest.mark.parametrize(
    "endpoint", ["127.0.0.1:4317", "grpc://h:4317", "http://h", "http://h:4317/v1/logs", "http://:4317"]
)
def test_an_endpoint_that_is_not_http_host_port_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"otlp_endpoint: expected http://HOST:PORT"):
        check_endpoint(endpoint)
    assert check_endpoint("https://collector.example:4317") == ("collector.example:4317", False)
    assert check_endpoint("http://127.0.0.1:4317/") == ("127.0.0.1:4317", True)


def test_a_full_queue_drops_and_counts_and_nothing_is_unaccounted() -> None:
    """Offered faster than the exporter thread takes them (a queue of 2): every generation is
    either turned into its events or counted dropped; none blocks the caller."""
    pytest.importorskip("opentelemetry.sdk")
    from monitor.harness.otlp import OtlpReceiver
    from monitor.telemetry import OtlpEvents

    counts = {"emitted": 0, "dropped": 0}

    def count(outcome: str, n: int) -> None:
        counts[outcome] += n

    result = ScoreResult("r", "m", (), {}, False, 0.0, 0, (detector("a", False, False), detector("b", True, True)))
    with OtlpReceiver() as rx:
        events = OtlpEvents(rx.endpoint, count=count, max_queue=2, schedule_delay_ms=50)
        for _ in range(2000):
            events.generation("Score", result, TraceContext(T, S, 1))
        events.close()
        received = len(rx.wait_for(counts["emitted"], timeout=10))
    assert counts["dropped"] > 0
    assert counts["emitted"] % 2 == 0 and counts["emitted"] // 2 + counts["dropped"] == 2000, counts
    assert received == counts["emitted"]
