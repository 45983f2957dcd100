"""Agreement of the critic with labels on clearly violating vs clean responses (issue 6 evaluation).

Labeled set, from ``data/detectors/refusal.jsonl`` (seeded sample): harmful requests answered by
the default model's own compliant answer (violating: it helps cause harm), the same kind of
requests answered with a written refusal (clean), and harmless requests with the model's own
answer (clean). The critic checks ``no_harm_assistance`` and ``least_harmful`` in fast mode
(one yes/no token), and ``no_harm_assistance`` in full mode on a smaller sample (parse failures
counted). Run: ``python scripts/critique_eval.py [--critic-url URL --critic-model NAME]``; without
a URL the default model runs in-process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path

import numpy as np

from monitor.critique import Critic, InProcessBackend, OpenAIChatBackend
from monitor.detectors._metrics import auroc

ROOT = Path(__file__).resolve().parents[1]


def labeled(n_per_class: int, seed: int = 0) -> list[tuple[str, str, int, str]]:
    rows = [json.loads(x) for x in (ROOT / "data/detectors/refusal.jsonl").read_text().splitlines()]
    harmful_groups = {
        json.loads(x)["group"]
        for x in (ROOT / "data/detectors/refusal_prompts.jsonl").read_text().splitlines()
        if json.loads(x)["harmful"]
    }
    comply = [r for r in rows if r["group"] in harmful_groups and r["label"] == 0]
    refuse = [r for r in rows if r["group"] in harmful_groups and r["label"] == 1]
    harmless = [r for r in rows if r["group"] not in harmful_groups and r["label"] == 0]
    rng = random.Random(seed)
    out = [
        (r["prompt"], r["response"], 1, "harmful request, compliant answer") for r in rng.sample(comply, n_per_class)
    ]
    out += [(r["prompt"], r["response"], 0, "harmful request, refusal") for r in rng.sample(refuse, n_per_class // 2)]
    out += [(r["prompt"], r["response"], 0, "harmless request, answer") for r in rng.sample(harmless, n_per_class // 2)]
    return out


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--critic-url")
    parser.add_argument("--critic-model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--n", type=int, default=60, help="violating items (as many clean ones)")
    parser.add_argument("--full-n", type=int, default=20, help="items for the full-mode run")
    ns = parser.parse_args()
    backend = OpenAIChatBackend(ns.critic_url, ns.critic_model, timeout=300) if ns.critic_url else InProcessBackend()
    items = labeled(ns.n)
    y = np.array([it[2] for it in items])
    print(f"critic: {backend.name}; {len(items)} items ({int(y.sum())} violating)")
    print("| mode | principle | n | agreement | AUROC of P(yes) | violating flagged | clean flagged | parse failures |")
    print("|---|---|---|---|---|---|---|---|")
    fast = Critic(backend, mode="fast", timeout=300)
    for principle in ("no_harm_assistance", "least_harmful"):
        t0 = time.perf_counter()
        verdicts = [await fast.check(p, r, fast.constitution.by_id[principle]) for p, r, _, _ in items]
        conf = np.array([v.confidence for v in verdicts])
        flagged = np.array([v.violated for v in verdicts])
        failures = sum(bool(v.parse_error) for v in verdicts)
        print(
            f"| fast | {principle} | {len(items)} | {float((flagged == y.astype(bool)).mean()):.2f} | "
            f"{auroc(y, conf):.2f} | {flagged[y == 1].mean():.2f} | {flagged[y == 0].mean():.2f} | {failures} |"
            f"  ({time.perf_counter() - t0:.0f} s)"
        )
    full = Critic(backend, mode="full", timeout=300)
    sub = items[: ns.full_n // 2] + items[-(ns.full_n // 2) :]
    ys = np.array([it[2] for it in sub])
    t0 = time.perf_counter()
    verdicts = [await full.check(p, r, full.constitution.by_id["no_harm_assistance"]) for p, r, _, _ in sub]
    parsed = np.array([not v.parse_error for v in verdicts])
    flagged = np.array([v.violated for v in verdicts])
    agree = float((flagged[parsed] == ys[parsed].astype(bool)).mean()) if parsed.any() else float("nan")
    print(
        f"| full | no_harm_assistance | {len(sub)} | {agree:.2f} (of {int(parsed.sum())} parsed) | – | "
        f"{flagged[ys == 1].mean():.2f} | {flagged[ys == 0].mean():.2f} | {int((~parsed).sum())} |"
        f"  ({time.perf_counter() - t0:.0f} s)"
    )


if __name__ == "__main__":
    asyncio.run(main())
