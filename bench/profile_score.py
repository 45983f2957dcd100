"""Profile: where a ``monitor serve`` process spends its CPU while answering Score (issue 24).

Starts ``monitor serve`` (default bundle), samples it with ``py-spy`` (``pip install py-spy``; it
needs ptrace rights over its child) while this process sends 512-token f32 Score requests with a
decision row, then sorts every sample by the first category its stack matches (in the order of
``CATEGORIES``) and prints a table: share of the server's busy samples per category.
Run: ``PYTHONPATH=. python bench/profile_score.py [--seconds 20] [--rate 500]``.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from monitor.client import Generation, MonitorClient
from monitor.server import SidecarProcess

MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
HOOK = "blocks.16.hook_resid_post"
# (category, substrings of a frame that put a sample in it); the first category that matches wins.
CATEGORIES = [
    ("SAE slice projection (one GEMM per hook point)", ["HookProjection.project"]),
    (
        "detector math after the projection (features, folds, ensembles)",
        ["Evidence.", "DetectorSet.", "LinearDetector.", "RunningScores."],
    ),
    ("request decode (protobuf parse, tensor views, validation)", ["decode (", "_blocks", "score_input", "_validate"]),
    ("text statistics", ["monitor/text/"]),
    ("acknowledge: audit, drift", ["_acknowledge.py", "monitor/audit.py", "monitor/drift/"]),
    ("Prometheus metrics", ["monitor/metrics.py"]),
    ("reply encode", ["_convert.py"]),
    (
        "thread-pool hand-off (futures, call_soon_threadsafe)",
        ["concurrent/futures", "call_soon_threadsafe", "_write_to_self", "run_in_executor"],
    ),
    ("gRPC and the event loop (cygrpc, asyncio)", ["grpc", "asyncio/", "selectors.py"]),
]


def categorize(folded: Path) -> tuple[int, collections.Counter[str]]:
    total, by = 0, collections.Counter[str]()
    for line in folded.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        total += int(n)
        name = next((c for c, keys in CATEGORIES if any(k in stack for k in keys)), "other")
        by[name] += int(n)
    return total, by


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--rate", type=int, default=500, help="py-spy samples per second")
    p.add_argument("--tokens", type=int, default=512)
    ns = p.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        print("profile_score: needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    x = rng.normal(size=(ns.tokens, 576)).astype(np.float32)
    d = rng.normal(size=(1, 576)).astype(np.float32)

    def gen(request_id: str) -> Generation:
        return Generation(request_id, MODEL, "Q?", "An answer of a few words.", {HOOK: x}, decision={HOOK: d})

    out = Path(tempfile.mkdtemp(prefix="profile-score-")) / "score.folded"
    sidecar = SidecarProcess().wait()
    sent = 0
    try:
        with MonitorClient(sidecar.target) as client:
            for i in range(20):  # warm-up, not sampled
                client.score(gen(f"w{i}"))
            cmd = [spy, "record", "--pid", str(sidecar.proc.pid), "--format", "raw", "-o", str(out)]
            cmd += ["--rate", str(ns.rate), "--nonblocking", "-d", str(int(ns.seconds))]
            rec = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stop = threading.Event()
            threading.Timer(ns.seconds, stop.set).start()
            t0 = time.perf_counter()
            while not stop.is_set():
                client.score(gen(f"r{sent}"))
                sent += 1
            elapsed = time.perf_counter() - t0
            rec.wait(ns.seconds + 30)
    finally:
        sidecar.stop()
    total, by = categorize(out)
    print(
        f"{sent} Score requests ({ns.tokens} tokens f32 + decision row) in {elapsed:.1f} s, "
        f"{elapsed / max(sent, 1) * 1000:.2f} ms each (round trip); {total} busy samples of the server"
    )
    print("| where the server's CPU goes | share |")
    print("|---|---|")
    for name, n in by.most_common():
        print(f"| {name} | {n / total:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
