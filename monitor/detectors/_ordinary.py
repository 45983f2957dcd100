"""Ordinary traffic: the model's normal workload, for calibrating critical detectors and measuring false alarms.

``data/ordinary/`` holds everyday instructions (AlpacaEval, IFEval, MT-Bench), borderline-safe
requests that sound harmful but should be answered (OR-Bench-Hard, OKTest, CoCoNot contrast) and
OR-Bench-Toxic's harmful counterparts. Each prompt falls, by a hash of its id, into the
``calibration`` half (critical thresholds and the harmful-compliance fit may use it) or the
``held_out`` half (only the false-alarm and HALT-rate figures read it). The served model's own
answers to them are generated once (``scripts/generate_answers.py``) into ``answers.jsonl``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

ORDINARY = Path(__file__).resolve().parents[2] / "data" / "ordinary"
ANSWERS_FILE = "answers.jsonl"
# folder -> kind; OR-Bench rows with category "toxic" are harmful whatever their folder
KINDS = {
    "A1_alpaca_eval": "everyday",
    "A4_ifeval": "everyday",
    "A5_mt_bench": "everyday",
    "B1_or_bench": "borderline",
    "B2_oktest": "borderline",
    "B5_coconot_contrast": "borderline",
}
HELD_OUT_FRACTION = 0.5
MAX_PROMPT_CHARS = 800  # longer prompts (a few IFEval/MT-Bench ones) are left out: prefill cost on CPU


@dataclass(frozen=True)
class OrdinaryPrompt:
    """One prompt of the workload: ``kind`` everyday / borderline / harmful, ``split`` calibration / held_out."""

    id: str
    folder: str
    source: str
    category: str
    kind: str
    split: str
    prompt: str


def split_of_id(row_id: str) -> str:
    """``held_out`` for a fixed half of the ids (by sha256), ``calibration`` for the rest.

    >>> split_of_id("A1_alpaca_eval-0"), split_of_id("A1_alpaca_eval-1")
    ('calibration', 'held_out')
    """
    h = int.from_bytes(hashlib.sha256(row_id.encode()).digest()[:8], "little")
    return "held_out" if (h % 1000) < HELD_OUT_FRACTION * 1000 else "calibration"


def load_ordinary_prompts(root: Path = ORDINARY) -> list[OrdinaryPrompt]:
    """Every usable prompt of ``data/ordinary`` with its kind and split."""
    out = []
    for folder, kind in KINDS.items():
        path = root / folder / "prompts.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"ordinary traffic: expected {path} (see data/ordinary/README.md)")
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            r = json.loads(line)
            if len(r["prompt"]) > MAX_PROMPT_CHARS:
                continue
            row_id = f"{folder}-{n}"
            k = "harmful" if r.get("category") == "toxic" else kind
            out.append(
                OrdinaryPrompt(row_id, folder, r["source"], r.get("category", ""), k, split_of_id(row_id), r["prompt"])
            )
    return out


@dataclass(frozen=True)
class OrdinaryAnswer:
    """A prompt of the workload with the served model's own greedy answer."""

    prompt: OrdinaryPrompt
    response: str


def load_ordinary_answers(root: Path = ORDINARY) -> list[OrdinaryAnswer]:
    """The prompts that have an answer in ``answers.jsonl``, in prompt order."""
    path = root / ANSWERS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"ordinary answers: expected {path}; make them with scripts/generate_answers.py (data/ordinary/SOURCE.md)"
        )
    answers = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        answers[r["id"]] = r["response"]
    return [OrdinaryAnswer(p, answers[p.id]) for p in load_ordinary_prompts(root) if p.id in answers]
