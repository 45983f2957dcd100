"""The labeled sets built from a model's *own* answers, for any model.

Three files of ``data/detectors/`` hold the served model's answers, so they must be rebuilt for
another model (``monitor bundle build``) from that model's answers, with exactly the rules the
default model's files were built with (``scripts/build_detector_data.py``,
``scripts/build_harmfulness_data.py``, ``scripts/build_ordinary_data.py`` call these functions):

- ``refusal.jsonl`` (``refusal_rows``): the model's own answers to the refusal prompts (label 0,
  unless a refusal phrase is already in them) and written refusals (label 1);
- ``harmful_compliance.jsonl`` (``compliance_rows``): harmful request AND not refused, on the
  prompts kept out of the harmfulness fit;
- ``ordinary.jsonl``: ``monitor.detectors._compliance.ordinary_rows``.

Every function reads a folder shaped like ``data/detectors`` and returns rows; ``jsonl_text``
serialises them the way the shipped files are written (byte for byte).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from monitor.text import load_lexicon

__all__ = ["COMPLIANCE_SOURCES", "compliance_rows", "jsonl_text", "labeled_row", "refusal_rows"]

# The harmfulness sources no fit uses: harmful_compliance is measured on these only.
COMPLIANCE_SOURCES = ("hh_rlhf_tqa", "rd_val_confusable")


def labeled_row(behaviour: str, source: str, group: str, prompt: str, response: str, label: int) -> dict[str, object]:
    """One labeled row, keys in the order every ``data/detectors`` file uses."""
    return {
        "behaviour": behaviour,
        "source": source,
        "group": group,
        "prompt": prompt,
        "response": response,
        "label": label,
    }


def jsonl_text(rows: Iterable[Mapping[str, Any]]) -> str:
    """Rows as the shipped JSONL files hold them (UTF-8 kept, one object per line)."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def refusal_rows(
    data: Path, rng: random.Random | None = None, log: Callable[[str], None] = print
) -> list[dict[str, object]]:
    """``refusal.jsonl`` from ``refusal_prompts.jsonl``, ``model_responses.jsonl`` (the model's own
    answers, ``{"group", "prompt", "response"}``) and ``refusal_styles.yaml`` in ``data``.

    Label 0: the model's own answer, dropped when it already contains a phrase of the refusal
    lexicon (its label would be a guess). Label 1: a written refusal (opener + reason + offer) for
    every harmful prompt and every third harmless one, in the ``apologetic`` style for the fitting
    source and ``declarative`` (disjoint wording) for the other. ``rng`` defaults to the seed the
    shipped file was built with.
    """
    rng = rng if rng is not None else random.Random("refusal")
    prompts = _jsonl(data / "refusal_prompts.jsonl")
    answers_path = data / "model_responses.jsonl"
    if not answers_path.is_file():
        raise FileNotFoundError(f"{answers_path} is missing: generate the model's answers to the refusal prompts first")
    answers = {r["group"]: r["response"] for r in _jsonl(answers_path)}
    styles = yaml.safe_load((data / "refusal_styles.yaml").read_text())
    phrases = load_lexicon("refusal")
    rows = []
    dropped = 0
    for i, p in enumerate(prompts):
        style = styles["apologetic" if p["source"] == "refusal_direction" else "declarative"]
        own = answers[p["group"]]
        if any(ph in own.lower() for ph in phrases):
            dropped += 1  # the model refused (or hedged) by itself: its label would be a guess
        else:
            rows.append(labeled_row("refusal", p["source"], p["group"], p["prompt"], own, 0))
        if p["harmful"] or i % 3 == 0:
            parts = [rng.choice(style["openers"]), rng.choice(style["reasons"]), rng.choice(style["offers"])]
            rows.append(
                labeled_row("refusal", p["source"], p["group"], p["prompt"], " ".join(x for x in parts if x), 1)
            )
    log(f"refusal: dropped {dropped} model answers that already contain a refusal phrase")
    return rows


def compliance_rows(data: Path) -> list[dict[str, object]]:
    """``harmful_compliance.jsonl``: (prompt, answer) rows, label 1 = harmful request answered.

    Only prompts kept out of the harmfulness fit (``COMPLIANCE_SOURCES`` of ``harmfulness.jsonl``).
    The answers are the refusal set's (``refusal.jsonl``: the model's own answer, or a written
    refusal) and, for the confusable prompts, the model's own answers
    (``confusable_responses.jsonl``, ``{"group", "prompt", "response"}``), always label 0.
    """
    harm = {r["prompt"]: r for r in _jsonl(data / "harmfulness.jsonl")}
    out: list[dict[str, object]] = []
    for r in _jsonl(data / "refusal.jsonl"):
        h = harm.get(r["prompt"])
        if h is None or h["source"] not in COMPLIANCE_SOURCES:
            continue
        label = int(h["label"] == 1 and r["label"] == 0)  # harmful request, and the answer is not a refusal
        out.append(
            {
                "source": h["source"],
                "group": r["group"],
                "prompt": r["prompt"],
                "response": r["response"],
                "label": label,
            }
        )
    for r in _jsonl(data / "confusable_responses.jsonl"):
        h = harm[r["prompt"]]
        if h["source"] == "rd_val_confusable":
            out.append(
                {
                    "source": h["source"],
                    "group": r["group"],
                    "prompt": r["prompt"],
                    "response": r["response"],
                    "label": 0,
                }
            )
    return [{"behaviour": "harmful_compliance", **r} for r in out]
