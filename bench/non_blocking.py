"""Benchmark: hot-path calls that must never wait on the network or a critic, against a peer.

Three calls promise to be a lock and a hand-off whatever happens downstream; each is timed in the
state that would make a blocking implementation slow, next to the same call in the easy state,
in the same run (the tests assert what these calls do; timing belongs here, off a shared CI box):

- ``MonitorClient.submit`` with the sidecar down vs up (1 000 calls, queue 50);
- ``SidecarStreams.push`` (the vLLM adapter, once per engine step) with the sidecar down vs up
  (200 steps of one row);
- ``CritiqueService.offer`` with a critic that never answers vs one that answers at once
  (10 x capacity offers, queue 4).

Run: ``python bench/non_blocking.py [--repeats 5]``. A ratio near 1 (or below) is the goal.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable

import numpy as np

from monitor.client import Generation, MonitorClient
from monitor.config import ServerConfig
from monitor.critique import ChatReply, Critic, CritiqueEvent, CritiqueService
from monitor.harness.sidecar import free_port
from monitor.integrations.vllm._streams import SidecarStreams
from monitor.server import BackgroundSidecar

HOOK, MODEL, D_MODEL = "blocks.16.hook_resid_post", "HuggingFaceTB/SmolLM2-135M-Instruct", 576


def median_of(repeats: int, fn: Callable[[], float]) -> float:
    """Median of ``repeats`` runs after one warm-up run (first calls pay for imports and set-up)."""
    fn()
    return statistics.median(fn() for _ in range(repeats))


def submit_seconds(target: str) -> float:
    x = np.ones((4, D_MODEL), np.float32)
    client = MonitorClient(target, queue_size=50, batch_size=10, max_backoff=0.5, timeout=2)
    try:
        t0 = time.perf_counter()
        for k in range(1000):
            client.submit(Generation(f"b{k}", MODEL, "", "ok", {HOOK: x}))
        return time.perf_counter() - t0
    finally:
        client.close(timeout=0.1)


def push_seconds(target: str) -> float:
    row = np.random.default_rng(0).normal(size=(1, D_MODEL)).astype(np.float32)
    streams = SidecarStreams(target, model=MODEL, keep_verdicts=4096)
    try:
        streams.open("x", [])
        t0 = time.perf_counter()
        for _ in range(200):
            streams.push({"x": {HOOK: row}})
        elapsed = time.perf_counter() - t0
        streams.finish("x", [])
        return elapsed
    finally:
        streams.close()


class _Backend:
    """A critic backend that answers at once, or never (``hang``)."""

    name = "bench"

    def __init__(self, hang: bool) -> None:
        self.hang = hang

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply:
        if self.hang:
            await asyncio.Event().wait()
        return ChatReply("no", {"no": -0.01, "yes": -5.0})

    async def aclose(self) -> None:
        return None


def offer_seconds(hang: bool) -> float:
    async def go() -> float:
        service = CritiqueService(Critic(_Backend(hang), mode="fast", timeout=300), max_queue=4, concurrency=1)
        await service.start()
        capacity = service.max_queue + service.concurrency
        t0 = time.perf_counter()
        for i in range(10 * capacity):
            service.offer(CritiqueEvent(f"r{i}", "Q?", "A.", True))
        elapsed = time.perf_counter() - t0
        await service.stop()
        return elapsed

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    ns = parser.parse_args()
    r = ns.repeats
    down = f"127.0.0.1:{free_port()}"
    sidecar = BackgroundSidecar(ServerConfig(port=0, metrics_port=0))
    try:
        up = sidecar.target
        rows = [
            ("submit x1000", "sidecar down", median_of(r, lambda: submit_seconds(down)), "sidecar up"),
            ("", "", median_of(r, lambda: submit_seconds(up)), ""),
            ("push x200", "sidecar down", median_of(r, lambda: push_seconds(down)), "sidecar up"),
            ("", "", median_of(r, lambda: push_seconds(up)), ""),
        ]
    finally:
        sidecar.stop()
    rows += [
        ("offer x50", "critic hangs", median_of(r, lambda: offer_seconds(True)), "critic answers"),
        ("", "", median_of(r, lambda: offer_seconds(False)), ""),
    ]
    print(f"median of {r} runs each")
    print(f"{'call':<14} {'hard state':<14} {'ms':>8}   {'peer':<15} {'ms':>8}   ratio")
    for (call, hard, t_hard, peer), (_, _, t_peer, _) in zip(rows[::2], rows[1::2], strict=True):
        print(f"{call:<14} {hard:<14} {t_hard * 1e3:8.2f}   {peer:<15} {t_peer * 1e3:8.2f}   {t_hard / t_peer:5.2f}")


if __name__ == "__main__":
    main()
