"""Benchmark: Score over gRPC on loopback vs the same pipeline called in-process (the peer).

Prints p50/p99 for 512-token requests at d_model 576 in f32/f16/bf16, the gRPC overhead
ratio, and the cost of the client's non-blocking ``submit()`` next to a blocking ``score()``.
Run: ``python bench/grpc_score.py [--n 200]``.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from monitor.client import Generation, MonitorClient
from monitor.config import ServerConfig
from monitor.pipeline import ActivationInput, ScoreInput
from monitor.server import BackgroundSidecar
from monitor.tensors import DType, encode

HOOK = "blocks.16.hook_resid_post"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--tokens", type=int, default=512)
    ns = parser.parse_args()
    x = np.random.default_rng(0).normal(size=(ns.tokens, 576)).astype(np.float32)
    sidecar = BackgroundSidecar(ServerConfig(port=0, metrics_port=0))
    bundle, proj = sidecar.server.bundle, sidecar.server.pipeline.detectors.projection(HOOK)
    columns = f"{proj.width} projection columns ({proj.n_latents} latents)" if proj is not None else "no detectors"
    print(f"bundle {bundle.name} {bundle.version} ({bundle.identity}): {columns}")
    try:
        with MonitorClient(sidecar.target, queue_size=ns.n * 2) as client:
            print(f"Score, {ns.tokens} tokens x d_model 576, n={ns.n} (ms)")
            print(f"{'dtype':6} {'in-process p50':>15} {'gRPC p50':>9} {'gRPC p99':>9} {'ratio p50':>10}")
            for dtype in (DType.F32, DType.F16, DType.BF16):
                wire = encode(x, dtype)
                local = ScoreInput("b", MODEL, output="x", activations=[ActivationInput(HOOK, wire)])
                t_local, t_grpc = [], []
                for _ in range(ns.n):
                    t0 = time.perf_counter()
                    sidecar.server.pipeline.score(local)
                    t_local.append(time.perf_counter() - t0)
                arr = x.astype(np.float16) if dtype is DType.F16 else x
                gen = Generation("b", MODEL, output="x", activations={HOOK: arr})
                for _ in range(ns.n):
                    t0 = time.perf_counter()
                    client.score(gen)
                    t_grpc.append(time.perf_counter() - t0)
                print(
                    f"{dtype.name:6} {pct(t_local, 50):15.3f} {pct(t_grpc, 50):9.3f} {pct(t_grpc, 99):9.3f} "
                    f"{pct(t_grpc, 50) / pct(t_local, 50):10.1f}x"
                )
            gen = Generation("s", MODEL, output="x", activations={HOOK: x})
            t_submit = []
            for _ in range(ns.n):
                t0 = time.perf_counter()
                client.submit(gen)
                t_submit.append(time.perf_counter() - t0)
            client.flush(60)
            t_score = []
            for _ in range(min(ns.n, 50)):
                t0 = time.perf_counter()
                client.score(gen)
                t_score.append(time.perf_counter() - t0)
            print(
                f"submit() p50 {pct(t_submit, 50) * 1000:.1f} us, p99 {pct(t_submit, 99) * 1000:.1f} us; "
                f"score() p50 {pct(t_score, 50):.3f} ms -> submit is "
                f"{pct(t_score, 50) / pct(t_submit, 50):.0f}x cheaper for the caller "
                f"(delivered {client.delivered}, dropped {client.dropped})"
            )
    finally:
        sidecar.stop()


if __name__ == "__main__":
    main()
