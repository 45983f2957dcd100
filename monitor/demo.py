"""``monitor demo``: the sidecar beside the real default model, with real traffic, live.

Starts the sidecar in-process, loads SmolLM2-135M-Instruct, answers a mix of prompts from
``data/demo/prompts.jsonl`` (ordinary, sycophancy bait, deception role-plays, harmful requests)
with greedy decoding, streams each generation's residual-stream activations to the sidecar
with ScoreStream chunk by chunk, and shows the verdicts as they arrive. ``/metrics`` is live
for a Prometheus to scrape while it runs.
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from monitor.client import DetectorVerdict, MonitorClient
from monitor.client._hooks import ResidualCapture
from monitor.config import ServerConfig
from monitor.detectors import Bundle
from monitor.server import BackgroundSidecar

PROMPTS = Path(__file__).resolve().parent.parent / "data" / "demo" / "prompts.jsonl"


@dataclass
class Row:
    n: int
    kind: str
    tokens: int
    chunks: int
    mean_norm: float
    chunk_ms: float
    advice: str
    detectors: str
    output: str


def load_prompts(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts: expected a JSONL file at {path}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def generate_monitored(
    model: Any,
    tokenizer: Any,
    capture: ResidualCapture,
    client: MonitorClient,
    request_id: str,
    model_id: str,
    prompt: str,
    kind: str,
    max_new_tokens: int,
    chunk_tokens: int,
) -> tuple[str, Any, int, float]:
    """Greedy decoding with a KV cache; every ``chunk_tokens`` new tokens go to the sidecar."""
    import torch

    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    cur = enc["input_ids"]
    stop_ids = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
    past = None
    generated: list[int] = []
    sent_text = ""
    chunk_seconds: list[float] = []
    verdict = None
    capture.take()
    with client.stream(request_id, model_id, prompt=prompt, labels={"route": kind}) as stream, torch.no_grad():
        for step in range(max_new_tokens + 1):
            out = model(input_ids=cur, past_key_values=past, use_cache=True)
            past = out.past_key_values
            acts = capture.take()
            if step == 0:
                pending = {hp: a[:0] for hp, a in acts.items()}  # prompt positions are not monitored
            else:
                pending = {hp: torch.cat([pending[hp], a]) for hp, a in acts.items()}
            nxt = int(out.logits[0, -1].argmax())
            done = nxt in stop_ids or step == max_new_tokens
            if not done:
                generated.append(nxt)
            rows = next(iter(pending.values())).shape[0]
            if rows >= chunk_tokens or done:
                text = tokenizer.decode(generated, skip_special_tokens=True)
                t0 = time.perf_counter()
                verdict = stream.send(pending, text[len(sent_text) :], final=done)
                chunk_seconds.append(time.perf_counter() - t0)
                sent_text = text
                pending = {hp: a[:0] for hp, a in pending.items()}
                if verdict.halt:
                    break
            if done:
                break
            cur = torch.tensor([[nxt]])
    output = tokenizer.decode(generated, skip_special_tokens=True)
    mean_ms = 1000 * sum(chunk_seconds) / max(len(chunk_seconds), 1)
    return output, verdict, len(chunk_seconds), mean_ms


def _detector_summary(detectors: Sequence[DetectorVerdict]) -> str:
    """One cell: each behaviour's ensemble probability, '!' when it fired."""
    parts = []
    for d in detectors:
        if d.detector.endswith(".ensemble"):
            parts.append(f"{d.behaviour[:3]} {d.probability:.2f}{'!' if d.fired else ''}")
    return " ".join(parts)


def _table(rows: list[Row], target: str, metrics_url: str) -> Table:
    t = Table(title=f"safety monitor demo - sidecar {target}, metrics {metrics_url}", expand=True)
    for col in ("#", "kind", "tokens", "chunks", "act |x| mean", "ms/chunk", "advice", "ensemble P (! = fired)"):
        t.add_column(col, no_wrap=True)
    t.add_column("output", overflow="ellipsis", no_wrap=True, ratio=1)
    for r in rows[-20:]:
        t.add_row(
            str(r.n),
            r.kind,
            str(r.tokens),
            str(r.chunks),
            f"{r.mean_norm:.1f}",
            f"{r.chunk_ms:.1f}",
            r.advice,
            r.detectors,
            r.output.replace("\n", " ")[:80],
        )
    return t


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
    config = ServerConfig(port=ns.port, metrics_port=ns.metrics_port, bundle=ns.bundle)
    sidecar = BackgroundSidecar(config, bundle)
    metrics_url = f"http://127.0.0.1:{sidecar.server.metrics_port}/metrics"
    console.print(f"[bold]sidecar[/] listening on {sidecar.target}; Prometheus can scrape {metrics_url}")
    try:
        with console.status("loading SmolLM2-135M-Instruct (first run converts the GGUF, ~30 s)"):
            model, tokenizer = load_default_model()
        prompts = load_prompts(Path(ns.prompts))
        hooks = [hp.name for hp in bundle.hook_points]
        rows: list[Row] = []
        start = time.monotonic()
        with (
            ResidualCapture(model, hooks) as capture,
            MonitorClient(sidecar.target) as client,
            Live(_table(rows, sidecar.target, metrics_url), console=console, refresh_per_second=4) as live,
        ):
            n = 0
            while True:
                item = prompts[n % len(prompts)]
                output, verdict, chunks, chunk_ms = generate_monitored(
                    model,
                    tokenizer,
                    capture,
                    client,
                    f"demo-{n}",
                    bundle.model,
                    item["prompt"],
                    item["kind"],
                    ns.max_new_tokens,
                    ns.chunk_tokens,
                )
                hs = verdict.hook_stats[0] if verdict and verdict.hook_stats else None
                rows.append(
                    Row(
                        n,
                        item["kind"],
                        hs.tokens if hs else 0,
                        chunks,
                        hs.mean_l2_norm if hs else 0.0,
                        chunk_ms,
                        "HALT" if verdict and verdict.halt else "continue",
                        _detector_summary(verdict.detectors if verdict else ()),
                        output,
                    )
                )
                live.update(_table(rows, sidecar.target, metrics_url))
                n += 1
                elapsed = time.monotonic() - start
                if ns.duration is not None and elapsed >= ns.duration:
                    break
                if ns.duration is None and n >= (ns.requests or len(prompts)):
                    break
        console.print(
            f"[bold]{n} generations[/] monitored in {time.monotonic() - start:.1f} s; "
            "sidecar counters read back from /metrics:"
        )
        for key, value in scrape_totals(sidecar.server.metrics_port).items():
            console.print(f"  {key} = {value:g}")
    finally:
        sidecar.stop()
    return 0


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run the sidecar beside the real default model with live traffic",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, help="seconds to run, looping over the prompts (default: one pass)")
    p.add_argument("--requests", type=int, help="number of generations when no --duration (default: all prompts)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--chunk-tokens", type=int, default=8, help="tokens per ScoreStream chunk")
    p.add_argument("--prompts", default=str(PROMPTS), help="JSONL of {kind, prompt}")
    p.add_argument("--bundle", help="detector bundle folder (default: the embedded default)")
    p.add_argument("--port", type=int, default=0, help="sidecar gRPC port (default: a free one)")
    p.add_argument("--metrics-port", type=int, default=9464, help="/metrics port (0: a free one)")
    p.set_defaults(func=run)
