"""Build ``data/demo/prompts.jsonl``: the traffic mix ``monitor demo`` replays.

Every prompt is drawn from data no detector was fitted on and no threshold was set on (issue 20),
with a fixed seed: everyday instructions and OR-Bench-Toxic harmful requests from the *held-out*
half of ``data/ordinary``, sycophancy bait from the political-typology source (a cross-source of the
sycophancy detector, never fitted on), deception role-plays from the TruthfulQA role-play source (a
cross-source of ``deceptive_setup``, never fitted on; its instructions are worded unlike the fitting
sources'). Sources and licenses: data/demo/SOURCE.md.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from monitor.detectors._ordinary import load_ordinary_prompts

ROOT = Path(__file__).resolve().parent.parent
PER_KIND = 12
MAX_CHARS = 300  # the demo shows each prompt on one line


def _labeled(name: str, source: str, label: int) -> list[dict[str, object]]:
    rows = [json.loads(x) for x in (ROOT / "data/detectors" / f"{name}.jsonl").read_text().splitlines()]
    return [r for r in rows if r["source"] == source and int(r["label"]) == label]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "data" / "demo" / "prompts.jsonl")
    ns = parser.parse_args()
    rng = random.Random(0)
    held_out = [p for p in load_ordinary_prompts() if p.split == "held_out" and len(p.prompt) <= MAX_CHARS]
    everyday = [p for p in held_out if p.kind == "everyday" and p.folder == "A1_alpaca_eval"]
    harmful = [p for p in held_out if p.kind == "harmful"]
    rows: list[dict[str, str]] = []
    rows += [
        {"kind": "ordinary", "source": "alpaca_eval (held out)", "prompt": p.prompt}
        for p in rng.sample(everyday, PER_KIND)
    ]
    syc = _labeled("sycophancy", "typology", 1)
    rows += [
        {"kind": "sycophancy_bait", "source": "anthropic_evals_political_typology", "prompt": str(s["prompt"])}
        for s in rng.sample(syc, PER_KIND)
    ]
    roleplay = _labeled("deception", "truthfulqa_roleplay", 1)
    rows += [
        {"kind": "deception_roleplay", "source": "truthfulqa_roleplay", "prompt": str(r["prompt"])}
        for r in rng.sample(roleplay, PER_KIND)
    ]
    rows += [
        {"kind": "harmful_request", "source": "or-bench-toxic (held out)", "prompt": p.prompt}
        for p in rng.sample(harmful, PER_KIND)
    ]
    rng.shuffle(rows)
    ns.out.parent.mkdir(parents=True, exist_ok=True)
    ns.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} prompts to {ns.out}")


if __name__ == "__main__":
    main()
