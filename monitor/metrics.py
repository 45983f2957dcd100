"""Every Prometheus metric the sidecar exports, defined in one place (listed in docs/operations.md).

``MonitorMetrics`` creates the metrics on a registry (a fresh one per test) and its
``record_*`` methods turn the pipeline's result objects into metric updates. Labels are
bounded: rpc, gRPC status code, hook point, reason keyword - never ids or text.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from monitor.detectors import DetectorResult
from monitor.drift import DriftMonitor
from monitor.pipeline import ScoreResult, StreamVerdict
from monitor.telemetry import TraceContext

__all__ = ["LATENCY_BUCKETS", "STAT_BUCKETS", "DriftCollector", "MonitorMetrics"]

PREFIX = "safety_monitor"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# One bucket layout for every text statistic (counts, rates per 100 words and ratios alike).
STAT_BUCKETS = (0, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 400, 600, 1000, 2000, 5000)
PROBABILITY_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
NORM_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
RPCS = ("Score", "ScoreStream", "Ingest", "GetDetectors")


class MonitorMetrics:
    """The sidecar's metrics on one registry, plus the recorder that updates them."""

    def __init__(self, registry: CollectorRegistry | None = None, drift: DriftMonitor | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.drift = drift
        r = self.registry
        if drift is not None:
            r.register(DriftCollector(drift))

        # -- build ----------------------------------------------------------------------
        self.build_info = Gauge(
            f"{PREFIX}_build_info",
            "Always 1; labels say which version and bundle this sidecar runs.",
            ["version", "bundle", "model"],
            registry=r,
        )
        # -- RPC traffic ----------------------------------------------------------------
        self.requests = Counter(
            f"{PREFIX}_requests_total",
            "RPCs finished, by method and gRPC status code.",
            ["rpc", "code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Wall time of an RPC inside the server, from first byte to last reply.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            f"{PREFIX}_in_flight_requests",
            "RPCs being processed now.",
            ["rpc"],
            registry=r,
        )
        self.received_bytes = Counter(
            f"{PREFIX}_received_bytes_total",
            "Activation payload bytes received and decoded.",
            ["rpc"],
            registry=r,
        )
        self.shed = Counter(
            f"{PREFIX}_shed_requests_total",
            "RPCs refused with RESOURCE_EXHAUSTED because max_in_flight was reached.",
            ["rpc"],
            registry=r,
        )
        self.send_timeouts = Counter(
            f"{PREFIX}_send_timeouts_total",
            "Streams ended because the client read no reply for send_timeout_seconds (a slow or stuck reader).",
            ["rpc"],
            registry=r,
        )
        self.receive_timeouts = Counter(
            f"{PREFIX}_receive_timeouts_total",
            "Calls ended: no complete message for stream_idle_seconds (a silent stream, an unfinished body).",
            ["rpc"],
            registry=r,
        )
        self.metrics_rejected = Counter(
            f"{PREFIX}_metrics_rejected_total",
            "/metrics connections refused or dropped, by reason (tls_handshake, unauthorized, connection, ...).",
            ["reason"],
            registry=r,
        )
        self.invalid = Counter(
            f"{PREFIX}_invalid_inputs_total",
            "Requests or items rejected with INVALID_ARGUMENT, by reason.",
            ["rpc", "reason"],
            registry=r,
        )
        # -- scoring ----------------------------------------------------------------------
        self.generations = Counter(
            f"{PREFIX}_generations_scored_total",
            "Finished generations scored (Score, Ingest items, completed streams).",
            ["rpc"],
            registry=r,
        )
        self.tokens = Counter(
            f"{PREFIX}_tokens_scored_total",
            "Activation rows (tokens) scored, by hook point.",
            ["hook_point"],
            registry=r,
        )
        self.stream_chunks = Counter(
            f"{PREFIX}_stream_chunks_total",
            "ScoreStream chunks scored.",
            registry=r,
        )
        self.pipeline_seconds = Histogram(
            f"{PREFIX}_pipeline_duration_seconds",
            "Time spent validating and scoring one generation or chunk (excludes queueing).",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.activation_norm = Histogram(
            f"{PREFIX}_activation_mean_l2_norm",
            "Mean L2 norm of a generation's activation rows, by hook point (input drift signal).",
            ["hook_point"],
            buckets=NORM_BUCKETS,
            registry=r,
        )
        self.ingest_items = Counter(
            f"{PREFIX}_ingest_items_total",
            "Items received on Ingest streams, by result (accepted or rejected).",
            ["result"],
            registry=r,
        )
        # -- detectors ------------------------------------------------------------------------
        self.detector_probability = Histogram(
            f"{PREFIX}_detector_probability",
            "Calibrated probability of each detector's behaviour per finished generation.",
            ["detector", "behaviour"],
            buckets=PROBABILITY_BUCKETS,
            registry=r,
        )
        self.detector_fired = Counter(
            f"{PREFIX}_detector_fired_total",
            "Finished generations on which a detector fired (score >= its threshold).",
            ["detector", "behaviour", "severity"],
            registry=r,
        )
        self.stream_halts = Counter(
            f"{PREFIX}_stream_halts_total",
            "Streams advised to HALT because a critical detector fired.",
            registry=r,
        )
        self.halts_by_detector = Counter(
            f"{PREFIX}_halts_by_detector_total",
            "HALTs advised, by each critical detector that fired when it was decided (one HALT may count for two).",
            ["detector"],
            registry=r,
        )
        self.flagged = Counter(
            f"{PREFIX}_generations_flagged_total",
            "Finished generations on which at least one detector fired.",
            ["rpc"],
            registry=r,
        )
        # -- text statistics and drift -------------------------------------------------------------
        self.text_statistic = Histogram(
            f"{PREFIX}_text_statistic",
            "Per-response text statistics (see docs/drift.md for each stat); fleet drift is computed from these.",
            ["stat"],
            buckets=STAT_BUCKETS,
            registry=r,
        )
        self.change_points = Counter(
            f"{PREFIX}_drift_change_points_total",
            "Change points (Page-Hinkley) detected per drift metric and direction.",
            ["metric", "direction"],
            registry=r,
        )
        # -- critiques ------------------------------------------------------------------------------
        self.critiques = Counter(
            f"{PREFIX}_critiques_total",
            "Critic findings by principle and verdict (violated, clean, parse_failure; '*' for timeout/error/failed).",
            ["principle", "verdict"],
            registry=r,
        )
        self.critique_queue_depth = Gauge(
            f"{PREFIX}_critique_queue_depth", "Events waiting for the critic.", registry=r
        )
        self.critique_dropped = Counter(
            f"{PREFIX}_critique_dropped_total",
            "Events the critique policy chose but the full queue dropped.",
            registry=r,
        )
        self.critique_seconds = Histogram(
            f"{PREFIX}_critique_duration_seconds",
            "Time to critique one event against all selected principles.",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.critique_parse_failures = Counter(
            f"{PREFIX}_critique_parse_failures_total",
            "Critic replies that could not be parsed (recorded, never guessed).",
            ["principle"],
            registry=r,
        )
        self.critique_high_severity = Counter(
            f"{PREFIX}_critique_high_severity_total",
            "High-severity violations found by the critic.",
            ["principle"],
            registry=r,
        )
        # -- debates (escalation of critical alerts) ------------------------------------------------
        self.debate_verdicts = Counter(
            f"{PREFIX}_debate_verdicts_total",
            "Debates over critical alerts, by winner: alert (confirmed), answer (not confirmed), tie, undecided.",
            ["winner"],
            registry=r,
        )
        self.debate_queue_depth = Gauge(f"{PREFIX}_debate_queue_depth", "Alerts waiting for a debate.", registry=r)
        self.debate_dropped = Counter(
            f"{PREFIX}_debate_dropped_total", "Alerts not debated because the debate queue was full.", registry=r
        )
        self.debate_errors = Counter(
            f"{PREFIX}_debate_errors_total",
            "Debates that ended without a verdict, by kind (timeout, unavailable, exception).",
            ["kind"],
            registry=r,
        )
        self.debate_seconds = Histogram(
            f"{PREFIX}_debate_duration_seconds",
            "Time to run one debate (answer, challenge, rounds, judge).",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.audit_records = Counter(
            f"{PREFIX}_audit_records_total",
            "Audit-log records, by result (written, or dropped when the queue was full or the disk failed).",
            ["result"],
            registry=r,
        )
        self.drift_state_corrupt = Counter(
            f"{PREFIX}_drift_state_corrupt_total",
            "Saved drift states found corrupt at start-up, moved aside (<file>.corrupt-<time>) and "
            "replaced by a fresh reference.",
            registry=r,
        )
        # -- OpenTelemetry ----------------------------------------------------------------
        self.otel_events = Counter(
            f"{PREFIX}_otel_events_total",
            "OTLP evaluation events: emitted (to the exporter), failed (not accepted by the receiver); "
            "dropped counts generations whose events were never built (queue full).",
            ["outcome"],
            registry=r,
        )
        self.trace_context_invalid = Counter(
            f"{PREFIX}_trace_context_invalid_total",
            "Malformed traceparent values ignored (the generation was scored without a trace), by where they came.",
            ["source"],
            registry=r,
        )
        for rpc in RPCS:  # so rates exist (as 0) before the first request
            self.in_flight.labels(rpc)
            self.request_seconds.labels(rpc)

    # -- recorder -----------------------------------------------------------------------------
    def record_rpc(self, rpc: str, code: str, seconds: float, trace: TraceContext | None = None) -> None:
        """One RPC finished with gRPC status ``code`` (e.g. "OK", "INVALID_ARGUMENT").

        ``trace``: the call's trace context, an exemplar of the latency (OpenMetrics scrapes show it).
        """
        self.requests.labels(rpc, code).inc()
        self.request_seconds.labels(rpc).observe(seconds, _exemplar(trace))

    def record_invalid(self, rpc: str, reason: str) -> None:
        self.invalid.labels(rpc, reason).inc()

    def record_score(self, rpc: str, result: ScoreResult, trace: TraceContext | None = None) -> None:
        """A finished generation was scored (``trace``: its trace context, the exemplar of its
        latency and detector observations)."""
        exemplar = _exemplar(trace)
        self.generations.labels(rpc).inc()
        self.received_bytes.labels(rpc).inc(result.bytes_received)
        self.pipeline_seconds.labels(rpc).observe(result.seconds, exemplar)
        for hs in result.hook_stats:
            self.tokens.labels(hs.hook_point).inc(hs.tokens)
            self.activation_norm.labels(hs.hook_point).observe(hs.mean_l2_norm)
        self._record_detectors(rpc, result.detectors, exemplar)
        self._record_text(result.text_stats, result.change_points)

    def _record_text(self, stats: Mapping[str, float], change_points: tuple[str, ...]) -> None:
        for k, v in stats.items():
            self.text_statistic.labels(k).observe(v)
        for metric in change_points:
            direction = self.drift.direction(metric) if self.drift is not None else ""
            self.change_points.labels(metric, direction or "unknown").inc()

    def _record_detectors(
        self, rpc: str, results: tuple[DetectorResult, ...], exemplar: dict[str, str] | None = None
    ) -> None:
        for d in results:
            self.detector_probability.labels(d.name, d.behaviour).observe(d.probability, exemplar)
            if d.fired:
                severity = "critical" if d.critical else "warning"
                self.detector_fired.labels(d.name, d.behaviour, severity).inc(1, exemplar)
        if any(d.fired for d in results):
            self.flagged.labels(rpc).inc()

    def record_chunk(self, verdict: StreamVerdict, trace: TraceContext | None = None) -> None:
        """A stream chunk was scored; a final chunk also counts its generation."""
        exemplar = _exemplar(trace)
        self.stream_chunks.inc()
        self.received_bytes.labels("ScoreStream").inc(verdict.new_bytes)
        self.pipeline_seconds.labels("ScoreStream").observe(verdict.seconds, exemplar)
        for hook, n in verdict.new_tokens.items():
            self.tokens.labels(hook).inc(n)
        if verdict.halted_now:
            self.stream_halts.inc(1, exemplar)
            for d in verdict.detectors:
                if d.critical and d.fired:
                    self.halts_by_detector.labels(d.name).inc(1, exemplar)
        if verdict.final:
            self.generations.labels("ScoreStream").inc()
            for hs in verdict.hook_stats:
                self.activation_norm.labels(hs.hook_point).observe(hs.mean_l2_norm)
            self._record_detectors("ScoreStream", verdict.detectors, exemplar)
            self._record_text(verdict.text_stats, verdict.change_points)


def _exemplar(trace: TraceContext | None) -> dict[str, str] | None:
    return trace.exemplar if trace is not None else None


class DriftCollector(Collector):
    """Computes drift gauges when Prometheus scrapes (the distances cost ~ms, so never per request)."""

    def __init__(self, drift: DriftMonitor) -> None:
        self.drift = drift

    def collect(self) -> Iterator[GaugeMetricFamily]:
        dist = GaugeMetricFamily(
            f"{PREFIX}_drift",
            "Distance of the current window from the reference, per drift metric and test (psi, ks, js, wasserstein).",
            labels=["metric", "test"],
        )
        drifted = GaugeMetricFamily(
            f"{PREFIX}_drift_alarm",
            "1 when a metric's PSI is at or above the alarm level (0.25 by default).",
            labels=["metric"],
        )
        ref = GaugeMetricFamily(
            f"{PREFIX}_drift_reference_events",
            "Events in a metric's reference sample (the reference is ready when this stops growing).",
            labels=["metric"],
        )
        window = GaugeMetricFamily(
            f"{PREFIX}_drift_window_events", "Events in a metric's current window.", labels=["metric"]
        )
        for r in self.drift.readings():
            for test in ("psi", "ks", "js", "wasserstein"):
                dist.add_metric([r.metric, test], getattr(r, test))
            drifted.add_metric([r.metric], float(r.drifted))
            ref.add_metric([r.metric], r.reference_events)
            window.add_metric([r.metric], r.window_events)
        yield from (dist, drifted, ref, window)

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
