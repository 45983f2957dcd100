"""Benchmark: what exporting evaluation events over OTLP costs a Score (issue 25; goal <= 5 % more).

Two ``monitor serve`` processes with the default bundle, one with ``--otlp-endpoint`` pointing at a
real OTLP/gRPC receiver (``monitor.harness.otlp``, in this process) and one without, are driven in
alternating blocks by the same client: 512-token f32 Score requests, each with its own request id
and a ``traceparent``. Reported per side: the sidecar's own time per Score (``server_seconds``)
and the client's round trip, p50 and p99, and the on/off ratio of the p50s. The run also checks
that every Score's events reached the receiver (a detector count per request).
Run: ``python bench/otel_overhead.py [--n 400] [--block 50]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from monitor.client import Generation, MonitorClient
from monitor.harness.otlp import OtlpReceiver
from monitor.server import SidecarProcess

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.16.hook_resid_post"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=400, help="timed Score requests per side")
    p.add_argument("--block", type=int, default=50, help="requests per side before switching")
    p.add_argument("--tokens", type=int, default=512)
    ns = p.parse_args()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ns.tokens, 576)).astype(np.float32)
    decision = rng.normal(size=(1, 576)).astype(np.float32)
    times: dict[str, dict[str, list[float]]] = {s: {"server": [], "rtt": []} for s in ("off", "on")}
    detectors = 0
    with OtlpReceiver() as rx:
        sides = {
            "off": SidecarProcess().wait(),
            "on": SidecarProcess("--otlp-endpoint", rx.endpoint).wait(),
        }
        clients = {s: MonitorClient(sp.target) for s, sp in sides.items()}
        try:
            for side, client in clients.items():  # warm-up, not timed
                for i in range(20):
                    client.score(Generation(f"warm-{side}-{i}", MODEL, output="x", activations={HOOK: x}))
            sent = 0
            while sent < ns.n:
                for side, client in clients.items():
                    for i in range(sent, min(sent + ns.block, ns.n)):
                        gen = Generation(
                            f"{side}-{i}",
                            MODEL,
                            output="x",
                            activations={HOOK: x},
                            decision={HOOK: decision},
                            traceparent=TRACEPARENT,
                        )
                        t0 = time.perf_counter()
                        reply = client.score(gen)
                        times[side]["rtt"].append(time.perf_counter() - t0)
                        times[side]["server"].append(reply.server_seconds)
                        detectors = len(reply.detectors)
                sent += ns.block
            want = ns.n * detectors  # the timed requests' events (the warm-up's come too)
            deadline = time.monotonic() + 30
            got = 0
            while time.monotonic() < deadline and got < want:
                got = sum(str(r.attributes.get("gen_ai.response.id", "")).startswith("on-") for r in rx.records)
                time.sleep(0.2)
        finally:
            for c in clients.values():
                c.close()
            for sp in sides.values():
                sp.stop()
    print(f"Score, {ns.tokens} tokens f32, {ns.n} requests per side in blocks of {ns.block}:")
    for side in ("off", "on"):
        t = times[side]
        print(
            f"  otel {side:3s}: server p50 {pct(t['server'], 50):.3f} ms  p99 {pct(t['server'], 99):.3f} ms | "
            f"round trip p50 {pct(t['rtt'], 50):.3f} ms  p99 {pct(t['rtt'], 99):.3f} ms"
        )
    for key, what in (("server", "server time"), ("rtt", "round trip")):
        ratio = pct(times["on"][key], 50) / pct(times["off"][key], 50)
        print(f"  on/off {what} p50: {ratio:.3f} (goal <= 1.05: {'met' if ratio <= 1.05 else 'NOT met'})")
    print(f"  events received: {got} of {want} expected")
    return 0 if got >= want else 1


if __name__ == "__main__":
    raise SystemExit(main())
