"""Benchmark: the cost of scoring with the default bundle's detectors, sliced vs full SAE encode.

One run prints (1) server-side Score latency p50/p99 for 512-token requests with the default
bundle (``server_seconds`` reported by the sidecar, plus the client's round trip), without and
with detectors (the same server, a bundle with its detectors removed is the peer), and (2) the
detector stage alone on the sliced path (one [d_model, K] projection) vs the full path (encode
all SAE latents, then read the ones the probes use), with the scores checked equal.
Run: ``python bench/score.py [--n 300]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

from monitor.client import Generation, MonitorClient
from monitor.config import ServerConfig
from monitor.detectors import Bundle, DetectorSet
from monitor.server import BackgroundSidecar

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


def full_path_scores(ds: DetectorSet, sae: object, hook: str, x: np.ndarray) -> dict[str, float]:
    """Scores computed by encoding every SAE latent first (what a non-sliced server would do)."""
    proj = ds.projections[hook]
    with torch.no_grad():
        z = sae.encode(torch.from_numpy(x)).numpy()  # type: ignore[attr-defined]
    feats = np.concatenate([z[:, proj.latent_ids], x @ proj.w[:, proj.n_latents :]], axis=1)
    out = {}
    for d in ds.runtime:
        s = feats[:, d.cols] @ d.weight + d.bias
        out[d.spec.name] = float(s.mean() if d.spec.aggregation == "mean" else s.max())
    return out


def serve_and_time(bundle: Bundle, ns: argparse.Namespace, x: np.ndarray, hook: str) -> tuple[list[float], list[float]]:
    sidecar = BackgroundSidecar(ServerConfig(port=0, metrics_port=0), bundle=bundle)
    server_s, rtt_s = [], []
    try:
        with MonitorClient(sidecar.target) as client:
            gen = Generation("b", MODEL, output="x", activations={hook: x})
            for _ in range(20):
                client.score(gen)
            for _ in range(ns.n):
                t0 = time.perf_counter()
                reply = client.score(gen)
                rtt_s.append(time.perf_counter() - t0)
                server_s.append(reply.server_seconds)
    finally:
        sidecar.stop()
    return server_s, rtt_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--blas-threads", type=int, default=1, help="as `monitor serve` sets it (0: leave as is)")
    ns = parser.parse_args()
    if ns.blas_threads:
        from monitor.server._lifecycle import limit_blas_threads

        limit_blas_threads(ns.blas_threads)
    bundle = Bundle.load()
    hook = bundle.hook_points[0].name
    ds = DetectorSet.from_bundle(bundle)
    sae = bundle.load_sae().float()
    x = (np.random.default_rng(0).normal(size=(ns.tokens, 576)) * 2.5).astype(np.float32)
    bare = dataclasses.replace(bundle, raw={**bundle.raw, "detectors": []})

    threads = ns.blas_threads or "default"
    print(
        f"Score with the default bundle ({len(ds.specs)} detectors), {ns.tokens} tokens x 576 f32, n={ns.n}, "
        f"BLAS threads {threads} (ms)"
    )
    print(f"{'server':22} {'server p50':>10} {'server p99':>10} {'round trip p50':>15} {'p99':>8}")
    for label, b in (("no detectors (peer)", bare), ("default bundle", bundle)):
        server_s, rtt_s = serve_and_time(b, ns, x, hook)
        print(
            f"{label:22} {pct(server_s, 50):10.3f} {pct(server_s, 99):10.3f} "
            f"{pct(rtt_s, 50):15.3f} {pct(rtt_s, 99):8.3f}"
        )

    proj = ds.projections[hook]
    sliced, full = [], []
    # Separate loops: interleaving torch's and numpy's thread pools makes both look slower.
    for _ in range(ns.n):
        t0 = time.perf_counter()
        a = {r.name: r.score for r in ds.score(hook, x)}
        sliced.append(time.perf_counter() - t0)
    for _ in range(ns.n):
        t0 = time.perf_counter()
        b = full_path_scores(ds, sae, hook, x)
        full.append(time.perf_counter() - t0)
    worst = max(abs(a[k] - b[k]) for k in a)
    print(
        f"\nDetector stage alone, {ns.tokens} tokens: sliced (K={proj.width} columns: {proj.n_latents} latents + "
        f"{proj.width - proj.n_latents} dense) p50 {pct(sliced, 50):.3f} ms, p99 {pct(sliced, 99):.3f} ms; "
        f"full encode ({sae.cfg.d_sae} latents) p50 {pct(full, 50):.3f} ms, p99 {pct(full, 99):.3f} ms"
    )
    print(
        f"sliced / full = {pct(sliced, 50) / pct(full, 50):.3f} "
        f"(full is {pct(full, 50) / pct(sliced, 50):.1f}x slower); "
        f"max score difference {worst:.2e}"
    )


if __name__ == "__main__":
    main()
