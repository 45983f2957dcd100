"""Benchmark: Score latency while a real Prometheus scrapes ``/metrics`` every second.

A scrape computes every drift distance (PSI, KS, JS, Wasserstein per tracked metric). The sidecar
copies the samples under the lock ``Score`` needs and computes the distances after releasing it,
so scraping must not stall scoring. The peer is the same `monitor serve` process, measured in the
same run without scraping. The drift references and windows are filled first (the expensive case).
Prints Score p50/p99 without and with scraping (goal: p99 within 1.5x) and the scrape duration.

Needs the `prometheus` binary (Debian package `prometheus`).
Run: ``python bench/scrape.py [--n 3000]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np

from monitor._proto import monitor_pb2 as pb
from monitor._proto import monitor_pb2_grpc as pb_grpc
from monitor.harness.sidecar import free_port
from monitor.server import SidecarProcess

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.16.hook_resid_post"


def requests(n: int, tokens: int) -> list[pb.ScoreRequest]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        x = (rng.normal(size=(tokens, 576)) * rng.uniform(1, 3)).astype(np.float32)
        t = pb.Tensor(shape=[tokens, 576], dtype=pb.DTYPE_F32, data=x.tobytes())
        words = " ".join(["word"] * int(rng.integers(5, 80)))
        out.append(
            pb.ScoreRequest(
                request_id=f"b{i}",
                model=MODEL,
                output=words,
                activations=[pb.ActivationBlock(hook_point=HOOK, activations=t)],
            )
        )
    return out


def timed(stub: pb_grpc.SafetyMonitorStub, reqs: list[pb.ScoreRequest]) -> list[float]:
    out = []
    for r in reqs:
        t0 = time.perf_counter()
        stub.Score(r, timeout=30)
        out.append(time.perf_counter() - t0)
    return out


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1000, q))


class Prometheus:
    """A real Prometheus scraping one target every ``interval`` seconds."""

    def __init__(self, metrics_port: int, interval: float) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise SystemExit("prometheus: expected the binary on PATH (apt-get install prometheus)")
        self.dir = Path(tempfile.mkdtemp(prefix="bench-prom-"))
        ms = f"{round(interval * 1000)}ms"  # Prometheus durations take no decimal point
        cfg = {
            "global": {"scrape_interval": ms, "scrape_timeout": ms},
            "scrape_configs": [{"job_name": "sidecar", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
        }
        (self.dir / "prometheus.yml").write_text(json.dumps(cfg))
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={self.dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def query(self, expr: str) -> list[dict]:  # type: ignore[type-arg]
        url = f"http://127.0.0.1:{self.port}/api/v1/query?query={urllib.request.quote(expr)}"
        return json.loads(urllib.request.urlopen(url, timeout=5).read())["data"]["result"]  # type: ignore[no-any-return]

    def wait_up(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if any(r["value"][1] == "1" for r in self.query("up")):
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError("prometheus never scraped the sidecar")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        shutil.rmtree(self.dir, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=3000, help="Score calls per phase")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--interval", type=float, default=1.0, help="scrape interval, seconds")
    ns = ap.parse_args()
    server = SidecarProcess().wait()
    prom = None
    try:
        with grpc.insecure_channel(server.target) as ch:
            stub = pb_grpc.SafetyMonitorStub(ch)
            reqs = requests(ns.n, ns.tokens)
            fill = requests(2600, 8)
            timed(stub, fill)  # 2000 reference + 500 window events per drift metric: the costly case
            quiet = timed(stub, reqs)
            prom = Prometheus(server.metrics_port, ns.interval)
            prom.wait_up()
            scraped = timed(stub, reqs)
            scrape_s = prom.query('scrape_duration_seconds{job="sidecar"}')
            samples = prom.query('scrape_samples_scraped{job="sidecar"}')
            drift = prom.query("count(safety_monitor_drift)")
    finally:
        if prom is not None:
            prom.stop()
        server.stop()
    print(f"Score, {ns.tokens} tokens x 576 f32, n={ns.n} per phase, drift references full (ms)")
    print(f"{'phase':40} {'p50':>8} {'p99':>8}")
    print(f"{'no scraping (peer)':40} {pct(quiet, 50):8.3f} {pct(quiet, 99):8.3f}")
    print(f"{f'Prometheus scraping every {ns.interval:g} s':40} {pct(scraped, 50):8.3f} {pct(scraped, 99):8.3f}")
    print(f"scraped / quiet p99 = {pct(scraped, 99) / pct(quiet, 99):.2f} (goal <= 1.5)")
    if scrape_s:
        print(
            f"last scrape: {1000 * float(scrape_s[0]['value'][1]):.1f} ms, "
            f"{samples[0]['value'][1]} samples, {drift[0]['value'][1] if drift else 0} drift series"
        )


if __name__ == "__main__":
    main()
