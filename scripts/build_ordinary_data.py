"""Ordinary traffic for calibration: the prompts to answer, then the labeled rows of the answers.

    python scripts/build_ordinary_data.py prompts --out runs/ordinary_prompts.jsonl
    .venv-vllm/bin/python scripts/generate_answers.py --engine vllm --model <converted default model> \\
        --prompts runs/ordinary_prompts.jsonl --out data/ordinary/answers.jsonl --max-new-tokens 32
    python scripts/build_ordinary_data.py label      # -> data/detectors/ordinary.jsonl

(``python -c "from monitor.models import default_model_cache; print(default_model_cache())"`` prints
the converted model's folder; ``make install`` creates it.) The split of each prompt (calibration /
held-out) and its kind come from ``monitor.detectors._ordinary``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from monitor.detectors._activations import DATA
from monitor.detectors._compliance import ORDINARY_FILE, ordinary_rows
from monitor.detectors._ordinary import load_ordinary_answers, load_ordinary_prompts
from monitor.text import load_lexicon


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("step", choices=("prompts", "label"))
    p.add_argument("--out", type=Path)
    ns = p.parse_args()
    if ns.step == "prompts":
        out = ns.out or Path("runs/ordinary_prompts.jsonl")
        rows = [{"id": q.id, "prompt": q.prompt} for q in load_ordinary_prompts()]
    else:
        out = ns.out or DATA / f"{ORDINARY_FILE}.jsonl"
        rows = ordinary_rows(load_ordinary_answers(), load_lexicon("refusal"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"{len(rows)} rows -> {out}")


if __name__ == "__main__":
    main()
