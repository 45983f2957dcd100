"""``monitor demo``: the sidecar and the reference inference server, with real traffic, live.

Starts the sidecar (gRPC + ``/metrics`` + audit log) and the OpenAI-compatible reference server
for the default model, monitored through ``GenerationMonitor``. It then replays a mix of prompts
from ``data/demo/prompts.jsonl`` (ordinary requests, sycophancy bait, deception role-plays,
harmful requests) over HTTP with streaming, as any client of the inference server would. The
terminal shows each request with its detector verdicts (read back from the sidecar's audit log),
its text statistics, the drift of every tracked metric and the alerts raised. ``/metrics`` is
live for a Prometheus to scrape. Runs until Ctrl-C, ``--duration`` or ``--requests``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from monitor.client import GenerationMonitor, MonitorClient
from monitor.config import ServerConfig
from monitor.detectors import Bundle
from monitor.reference import ReferenceServer, iter_sse
from monitor.server import BackgroundSidecar

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "demo" / "prompts.jsonl"
BEHAVIOURS = ("deceptive_setup", "deceptive_answer", "sycophancy", "refusal", "harmful_compliance")
_COLUMN = {
    "harmful_compliance": "P(harm∧comply)",
    "deceptive_setup": "P(dec.setup)",
    "deceptive_answer": "P(dec.ans)",
}


@dataclass
class Row:
    n: int
    kind: str
    tokens: int
    finish: str
    record: dict[str, Any]
    output: str


def load_prompts(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts: expected a JSONL file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class AuditTail:
    """Reads the sidecar's audit log as it grows and finds the record of a request id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._seen: dict[str, dict[str, Any]] = {}

    def wait_for(self, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while request_id not in self._seen and time.monotonic() < deadline:
            if self.path.is_file():
                with self.path.open(encoding="utf-8") as f:
                    f.seek(self._offset)
                    for line in f:
                        if line.endswith("\n"):
                            rec = json.loads(line)
                            self._seen[rec["request_id"]] = rec
                            self._offset += len(line.encode())
            if request_id not in self._seen:
                time.sleep(0.05)
        return self._seen.pop(request_id, {})


def chat(url: str, prompt: str, max_tokens: int, model: str = "") -> tuple[str, str, dict[str, Any], int]:
    """One streaming chat completion over HTTP: (text, finish reason, safety_monitor field, chunks).

    The reference server names the sidecar's request id in a ``safety_monitor`` field; vLLM's
    adapter uses the completion's own ``id``, so that is the fallback.
    """
    payload: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}
    if model:
        payload["model"] = model
    body = json.dumps({**payload, "stream": True})
    req = urllib.request.Request(f"{url}/v1/chat/completions", body.encode(), {"Content-Type": "application/json"})
    text, finish, n = "", "", 0
    monitored: dict[str, Any] = {}
    with urllib.request.urlopen(req, timeout=300) as resp:
        for event in iter_sse(resp):
            choice = event["choices"][0]
            text += choice["delta"].get("content", "")
            finish = choice["finish_reason"] or finish
            monitored = event.get("safety_monitor", monitored)
            monitored.setdefault("request_id", event.get("id", ""))
            n += 1
    return text, finish, monitored, n


def _cell(rec: dict[str, Any], behaviour: str, pad: bool = False) -> str:
    """A behaviour's probability (its ensemble's when there is one); fired ones red with a ``!``.
    ``pad``: a space where the ``!`` would be, so the narrow view's column never widens."""
    dets = rec.get("detectors", {})
    d = dets.get(f"{behaviour}.ensemble", dets.get(behaviour))
    if d is None:
        return "–"
    return f"[bold red]{d['probability']:.2f}![/]" if d["fired"] else f"{d['probability']:.2f}" + (" " if pad else "")


def _why(rec: dict[str, Any]) -> str:
    """The top SAE latent behind the first fired detector (harmful_compliance first): what the alert rests on."""
    dets = rec.get("detectors", {})
    for name, d in sorted(dets.items(), key=lambda kv: kv[0] != "harmful_compliance"):
        if d["fired"] and d["top_latents"]:
            lat, label = d["top_latents"][0]
            return f"{name}: latent {lat} “{label}”"
    return ""


WIDE = 120  # columns from which the view shows tokens, hedging, the top latent and the output
_NARROW_HEADER = {
    "deceptive_setup": "d.set",
    "deceptive_answer": "d.ans",
    "sycophancy": "syc",
    "refusal": "ref",
    "harmful_compliance": "harm",
}
_FINISH = {"content_filter": "HALT", "length": "len"}


def requests_table(rows: list[Row], title: str, width: int) -> Table:
    """The last requests with their verdicts. Every probability stays whole at any width: below
    ``WIDE`` columns the table keeps the verdicts and drops the context (80 columns fit)."""
    wide = width >= WIDE
    t = Table(title=title, expand=True, pad_edge=wide, padding=(0, 1) if wide else (0, 0))
    if wide:
        heads = ["#", "kind", "tokens", "finish", *(_COLUMN.get(b, f"P({b[:3]})") for b in BEHAVIOURS)]
        heads += ["words", "hedge/100w"]
    else:
        heads = ["#", "kind", "fin", *(_NARROW_HEADER[b] for b in BEHAVIOURS), "words"]
    for col in heads:
        t.add_column(col, no_wrap=True, justify="right" if col not in ("kind", "finish", "fin") else "left")
    if wide:
        t.add_column("why (top latent of a fired detector)", overflow="ellipsis", no_wrap=True, ratio=1)
        t.add_column("output", overflow="ellipsis", no_wrap=True, ratio=1)
    for r in rows[-14:]:
        ts = r.record.get("text_stats", {})
        cells = [str(r.n), r.kind if wide else r.kind.split("_")[0][:9]]
        if wide:
            cells += [str(r.tokens), r.finish]
        else:
            cells += [_FINISH.get(r.finish, r.finish[:4])]
        cells += [_cell(r.record, b, pad=not wide) for b in BEHAVIOURS]
        cells += [f"{ts.get('words', 0):.0f}"]
        if wide:
            cells += [f"{ts.get('hedge_rate', 0):.1f}", _why(r.record), r.output.replace("\n", " ")[:80]]
        t.add_row(*cells)
    return t


def drift_table(readings: list[Any], width: int) -> Table:
    """The most-drifted text metrics (current window vs reference)."""
    wide = width >= WIDE
    t = Table(title="drift (current window vs reference)", expand=True)
    cols = ("metric", "reference", "window", "PSI", "KS", "change points", "alarm")
    for col in cols if wide else ("metric", "ref", "win", "PSI", "KS", "cp", "alarm"):
        t.add_column(col, no_wrap=True)
    for d in readings[:6]:
        t.add_row(
            d.metric,
            str(d.reference_events),
            str(d.window_events),
            f"{d.psi:.2f}",
            f"{d.ks:.2f}",
            str(d.change_points),
            "[bold red]DRIFT[/]" if d.drifted else "",
        )
    return t


def _view(rows: list[Row], sidecar: BackgroundSidecar, ref_url: str, metrics_url: str, width: int) -> Group:
    title = (
        f"requests to {ref_url} (sidecar {sidecar.target}, metrics {metrics_url})"
        if width >= WIDE
        else f"requests to {ref_url}"
    )
    first = ("text.words", "text.tokens", "text.hedge_rate", "text.bullets_per_100w", "text.agreement_opener")
    readings = sorted(
        (r for r in sidecar.server.drift.readings() if r.metric.startswith("text.")),
        key=lambda r: (-round(r.psi, 2), first.index(r.metric) if r.metric in first else len(first), r.metric),
    )
    fired: dict[str, int] = {}
    halts = 0
    for r in rows:
        for name, d in r.record.get("detectors", {}).items():
            fired[name] = fired.get(name, 0) + int(d["fired"])
        halts += r.finish == "content_filter"
    alerts = ", ".join(f"{k} ×{v}" for k, v in sorted(fired.items()) if v) or "none"
    return Group(
        requests_table(rows, title, width),
        drift_table(readings, width),
        f"[bold]alerts[/]: detectors fired: {alerts}; streams halted: {halts}\n",
    )


def scrape_totals(metrics_port: int) -> dict[str, float]:
    """Read back the sidecar's own counters over HTTP (what a Prometheus would see)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    totals: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (
                "safety_monitor_requests_total",
                "safety_monitor_tokens_scored_total",
                "safety_monitor_stream_chunks_total",
                "safety_monitor_generations_scored_total",
                "safety_monitor_detector_fired_total",
                "safety_monitor_stream_halts_total",
                "safety_monitor_audit_records_total",
            ):
                key = s.name + (
                    "{" + ",".join(f"{k}={v}" for k, v in sorted(s.labels.items())) + "}" if s.labels else ""
                )
                totals[key] = s.value
    return totals


def run(ns: argparse.Namespace) -> int:
    from monitor.models import load_default_model

    console = Console()
    bundle = Bundle.load(ns.bundle)
    audit = Path(ns.audit_log) if ns.audit_log else Path(tempfile.mkdtemp(prefix="monitor-demo-")) / "audit.jsonl"
    config = ServerConfig(
        port=ns.port,
        metrics_port=ns.metrics_port,
        bundle=ns.bundle,
        audit_log=str(audit),
        drift_reference_events=ns.drift_reference,
    )
    sidecar = BackgroundSidecar(config, bundle)
    metrics_url = f"http://127.0.0.1:{sidecar.server.metrics_port}/metrics"
    console.print(f"[bold]sidecar[/] on {sidecar.target}; Prometheus can scrape {metrics_url}; audit log {audit}")
    ref: Any = None
    client = MonitorClient(sidecar.target)
    try:
        with console.status("loading SmolLM2-135M-Instruct (the first run converts the GGUF, ~30 s)"):
            model, tokenizer = load_default_model()
        if ns.engine == "vllm":
            ref = _start_vllm(ns, sidecar, bundle.model, console)
        else:
            hooks = [hp.name for hp in bundle.hook_points]
            mon = GenerationMonitor(
                model,
                client,
                model_id=bundle.model,
                hook_points=hooks,
                tokenizer=tokenizer,
                chunk_tokens=ns.chunk_tokens,
            )
            ref = ReferenceServer(model, tokenizer, bundle.model, mon, port=ns.http_port).start()
            console.print(f"[bold]reference server[/] (OpenAI-compatible) on {ref.url}/v1/chat/completions")
        prompts = load_prompts(Path(ns.prompts))
        tail = AuditTail(audit)
        rows: list[Row] = []
        start = time.monotonic()
        n = 0
        try:

            def view() -> Group:  # the terminal's width is read at every refresh (a resized window)
                return _view(rows, sidecar, ref.url, metrics_url, console.width)

            with Live(view(), console=console, refresh_per_second=4) as live:
                while True:
                    item = prompts[n % len(prompts)]
                    text, finish, monitored, _chunks = chat(ref.url, item["prompt"], ns.max_new_tokens, bundle.model)
                    record = tail.wait_for(str(monitored.get("request_id", "")))
                    tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
                    rows.append(Row(n, item["kind"], tokens, finish, record, text))
                    live.update(view())
                    n += 1
                    elapsed = time.monotonic() - start
                    if ns.duration is not None and elapsed >= ns.duration:
                        break
                    if ns.duration is None and n >= (ns.requests or len(prompts)):
                        break
        except KeyboardInterrupt:
            console.print("interrupted")
        console.print(
            f"[bold]{n} generations[/] monitored in {time.monotonic() - start:.1f} s; "
            "sidecar counters read back from /metrics:"
        )
        for key, value in scrape_totals(sidecar.server.metrics_port).items():
            console.print(f"  {key} = {value:g}")
    finally:
        if ref is not None:
            ref.stop()
        client.close()
        sidecar.stop()
    return 0


def _start_vllm(ns: argparse.Namespace, sidecar: BackgroundSidecar, model_id: str, console: Console) -> Any:
    """``vllm serve`` from vLLM's environment with the adapter on (only SAFETY_MONITOR_SIDECAR set)."""
    import socket

    from monitor.harness.vllm import VllmServer
    from monitor.models import default_model_cache

    port = ns.http_port
    if port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
    work = Path(tempfile.mkdtemp(prefix="monitor-demo-vllm-"))
    server = VllmServer(default_model_cache(), port=port, workdir=work, served_name=model_id, sidecar=sidecar.target)
    try:
        with console.status(f"starting vllm serve (about 30-60 s; log {server.log_path})"):
            server.wait_ready()
    except BaseException:
        server.stop()
        raise
    console.print(f"[bold]vllm serve[/] (OpenAI-compatible, adapter on) on {server.url}/v1/chat/completions")
    return server


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="the sidecar + the reference inference server with live traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--engine",
        choices=("reference", "vllm"),
        default="reference",
        help="inference server: the reference server, or `vllm serve` with the adapter (make install-vllm)",
    )
    p.add_argument("--duration", type=float, help="seconds to run, looping over the prompts (default: one pass)")
    p.add_argument("--requests", type=int, help="number of requests when no --duration (default: all prompts)")
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--chunk-tokens", type=int, default=8, help="tokens per ScoreStream chunk")
    p.add_argument("--prompts", default=str(PROMPTS), help="JSONL of {kind, prompt}")
    p.add_argument("--bundle", help="detector bundle folder (default: the embedded default)")
    p.add_argument("--port", type=int, default=0, help="sidecar gRPC port (default: a free one)")
    p.add_argument("--metrics-port", type=int, default=9464, help="/metrics port (0: a free one)")
    p.add_argument("--http-port", type=int, default=8000, help="reference server port (0: a free one)")
    p.add_argument("--audit-log", help="audit log file (default: a temporary folder)")
    p.add_argument("--drift-reference", type=int, default=24, help="reference events per drift metric")
    p.set_defaults(func=run)
