"""Benchmark: the reference server's generation speed with monitoring off and on, in one run.

The sidecar runs as its own process (``monitor serve``), as it would beside an inference server,
so its CPU use competes with generation exactly as in a deployment on the same node. Each prompt
is generated greedily with monitoring off, then on (alternating, so thermal or cache drift hits
both), and tokens/s is total completion tokens / total generation time.
Run: ``python bench/overhead.py [--prompts 8 --max-tokens 64 --rounds 2]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import grpc

from monitor.client import GenerationMonitor, MonitorClient
from monitor.models import load_default_model
from monitor.reference import ChatRequest, ReferenceServer

ROOT = Path(__file__).resolve().parents[1]


def start_sidecar(port: int, audit_log: Path | None = None) -> subprocess.Popen[bytes]:
    extra = ["--audit-log", str(audit_log)] if audit_log is not None else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "monitor", "serve", "--port", str(port), "--metrics-port", "0", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        while time.monotonic() < deadline:
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return proc
            except grpc.FutureTimeoutError:
                pass
    proc.kill()
    raise RuntimeError("the sidecar did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--chunk-tokens", type=int, default=16)
    parser.add_argument("--port", type=int, default=50077)
    ns = parser.parse_args()
    prompts = [json.loads(x)["prompt"] for x in (ROOT / "data/demo/prompts.jsonl").read_text().splitlines()]
    prompts = prompts[: ns.prompts]
    model, tok = load_default_model()
    model_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    proc = start_sidecar(ns.port)
    try:
        with MonitorClient(f"127.0.0.1:{ns.port}") as client:
            hook = client.get_detectors().hook_points[0].name
            mon = GenerationMonitor(
                model, client, model_id=model_id, hook_points=[hook], tokenizer=tok, chunk_tokens=ns.chunk_tokens
            )
            servers = {
                "off": ReferenceServer(model, tok, model_id, None, port=0),
                "on": ReferenceServer(model, tok, model_id, mon, port=0),
            }
            totals = {"off": [0, 0.0], "on": [0, 0.0]}
            req0 = ChatRequest([{"role": "user", "content": "Hello"}], max_tokens=8)
            servers["off"].complete(req0, "warm-off")
            servers["on"].complete(req0, "warm-on")
            n = 0
            for _ in range(ns.rounds):
                for p in prompts:
                    req = ChatRequest([{"role": "user", "content": p}], max_tokens=ns.max_tokens)
                    for mode in ("off", "on"):
                        t0 = time.perf_counter()
                        r = servers[mode].complete(req, f"bench-{mode}-{n}")
                        totals[mode][1] += time.perf_counter() - t0
                        totals[mode][0] += r["completion_tokens"]
                        if mode == "on" and r["safety_monitor"]["error"]:
                            raise RuntimeError(f"monitoring failed: {r['safety_monitor']['error']}")
                    n += 1
            for s in servers.values():
                s.httpd.server_close()
    finally:
        proc.terminate()
        proc.wait(30)
    off = totals["off"][0] / totals["off"][1]
    on = totals["on"][0] / totals["on"][1]
    print(
        f"{n} generations per mode, greedy, <= {ns.max_tokens} new tokens, chunks of {ns.chunk_tokens} tokens, "
        f"sidecar in its own process"
    )
    print(f"monitoring off: {totals['off'][0]} tokens in {totals['off'][1]:.1f} s = {off:.1f} tokens/s")
    print(f"monitoring on:  {totals['on'][0]} tokens in {totals['on'][1]:.1f} s = {on:.1f} tokens/s")
    print(f"on / off = {on / off:.3f} (goal >= 0.98)")


if __name__ == "__main__":
    main()
