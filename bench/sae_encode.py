"""Benchmark: full SAE encode vs the sliced encoder (torch and onnxruntime), one run.

Two sizes: the default model's (d_model 576, d_sae 4 608) and a large model's (d_model 4 096,
d_sae 65 536), with 96 latents used by detectors, on a batch of tokens. Prints median times and
the full/sliced ratios. TopK is shown too: its slice needs the full encode, so no speed-up.
Run: ``python bench/sae_encode.py [--tokens 64] [--repeats 20]``.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from monitor.sae import SAE, OnnxSlicedEncoder, SAEConfig, SlicedEncoder


def timed(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_sae(d_in: int, d_sae: int, arch: str = "relu") -> SAE:
    g = torch.Generator().manual_seed(0)
    state = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.zeros(d_sae),
        "W_dec": torch.zeros(d_sae, d_in),  # encode-only benchmark
        "b_dec": torch.zeros(d_in),
    }
    return SAE.from_state(SAEConfig(d_in, d_sae, architecture=arch, k=64 if arch == "topk" else None), state)


def shipped_bundle_columns() -> str:
    """What the shipped bundle really slices, printed beside the figures so a stale one shows."""
    from monitor.detectors import Bundle, DetectorSet

    bundle = Bundle.load()
    ds = DetectorSet.from_bundle(bundle)
    parts = [
        f"{hp}: {p.width} columns ({p.n_latents} latents + {p.width - p.n_latents} dense)"
        for hp, p in ds.projections.items()
    ]
    return f"shipped bundle {bundle.name} {bundle.version} ({bundle.identity}): " + "; ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=64, help="tokens per encode call")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--latents", type=int, default=96)
    ns = parser.parse_args()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {ns.tokens} tokens per call, "
        f"{ns.latents} latents used; median of {ns.repeats} (ms)"
    )
    print(shipped_bundle_columns())
    print(
        f"{'d_model':>7} {'d_sae':>6} {'arch':>5} {'full':>9} {'sliced':>8} {'onnx':>8} {'full/sliced':>12} "
        f"{'full/onnx':>10}"
    )
    for d_in, d_sae in ((576, 4608), (4096, 65536)):
        x = torch.randn(ns.tokens, d_in)
        xn = x.numpy()
        ids = torch.randperm(d_sae, generator=torch.Generator().manual_seed(1))[: ns.latents].tolist()
        for arch in ("relu", "topk"):
            sae = random_sae(d_in, d_sae, arch)
            sliced = SlicedEncoder(sae, ids)
            with torch.no_grad():
                t_full = timed(lambda s=sae, x=x: s.encode(x), ns.repeats)
                t_slice = timed(lambda s=sliced, x=x: s.encode(x), ns.repeats)
            if arch == "relu":
                with tempfile.TemporaryDirectory() as tmp:
                    onnx = OnnxSlicedEncoder(sliced.export_onnx(Path(tmp) / "s.onnx"))
                    np.testing.assert_allclose(onnx.encode(xn), sliced.encode(x).numpy(), rtol=1e-4, atol=1e-4)
                    t_onnx = timed(lambda o=onnx, x=xn: o.encode(x), ns.repeats)
                onnx_s, ratio_onnx = f"{t_onnx * 1e3:8.3f}", f"{t_full / t_onnx:9.0f}x"
            else:
                onnx_s, ratio_onnx = f"{'-':>8}", f"{'-':>10}"
            print(
                f"{d_in:7d} {d_sae:6d} {arch:>5} {t_full * 1e3:9.3f} {t_slice * 1e3:8.3f} {onnx_s} "
                f"{t_full / t_slice:11.1f}x {ratio_onnx}"
            )


if __name__ == "__main__":
    main()
