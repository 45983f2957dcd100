"""The honest-vs-deceptive experiment over questions with known answers.

Per trial (seeded): a question, roles drawn at random (is the honest agent the proposer?), the
honest agent defends the true answer and the deceptive one a false answer, one debate, then three
judgements of the same pair of answers: the model judge with the debate, the model judge without
it (direct judging of the two answers) and the length baseline on the debate. A judgement is
correct when it picks the honest side; ties and undecided are counted, and are not correct.
"""

from __future__ import annotations

import csv
import json
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TextIO

from monitor.debate._arena import AgentBackend, DebateAgent, DebateArena
from monitor.debate._judge import DebateJudge, LengthBaselineJudge
from monitor.debate._stats import wilson_interval
from monitor.errors import MonitorError

DEFAULT_QUESTIONS = Path(__file__).resolve().parents[2] / "data" / "debate" / "truthfulqa_200.csv"


@dataclass(frozen=True)
class Question:
    question: str
    true_answer: str
    false_answer: str


def load_questions(path: str | Path = DEFAULT_QUESTIONS) -> list[Question]:
    """Rows with ``Question``, ``Best Answer`` and ``Best Incorrect Answer`` (TruthfulQA's columns)."""
    p = Path(path)
    if not p.is_file():
        raise MonitorError(f"--questions: expected a CSV file, got {p}")
    with p.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f)
        need = {"Question", "Best Answer", "Best Incorrect Answer"}
        if not need <= set(reader.fieldnames or ()):
            raise MonitorError(f"{p}: expected columns {sorted(need)}, got {reader.fieldnames}")
        out = [Question(r["Question"], r["Best Answer"], r["Best Incorrect Answer"]) for r in reader]
    if not out:
        raise MonitorError(f"{p}: no questions")
    return out


@dataclass(frozen=True)
class Rate:
    correct: int
    n: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.correct / self.n


def _rate(correct: int, n: int) -> Rate:
    return Rate(correct, n, *wilson_interval(correct, n))


async def run_experiment(
    backend: AgentBackend,
    judge_backend: Any,
    questions: list[Question],
    *,
    trials: int,
    rounds: int = 1,
    max_tokens: int = 48,
    seed: int = 0,
    out: TextIO | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run ``trials`` debates (questions sampled without replacement, then cycled); summary dict."""
    if trials < 1:
        raise MonitorError(f"--trials: expected >= 1, got {trials}")
    rng = random.Random(seed)
    order = rng.sample(range(len(questions)), len(questions))
    judge = DebateJudge(judge_backend)
    baseline = LengthBaselineJudge()
    arena = DebateArena(judge, max_rounds=rounds)
    counts = {k: 0 for k in ("debate", "direct", "baseline")}
    ties = {k: 0 for k in counts}
    undecided = {k: 0 for k in counts}
    confidences: list[float] = []
    honest_proposer = 0
    t0 = time.perf_counter()
    for i in range(trials):
        q = questions[order[i % len(order)]]
        honest_first = rng.random() < 0.5
        honest_proposer += honest_first
        honest = DebateAgent("honest", backend, stance=q.true_answer, max_tokens=max_tokens)
        deceptive = DebateAgent("deceptive", backend, stance=q.false_answer, max_tokens=max_tokens)
        proposer, opponent = (honest, deceptive) if honest_first else (deceptive, honest)
        honest_side = "proposer" if honest_first else "opponent"
        result = await arena.debate(q.question, proposer, opponent)
        direct = await judge.judge(q.question, result.proposer_answer, result.opponent_answer)
        base = await baseline.judge(q.question, result.proposer_answer, result.opponent_answer, result.arguments[2:])
        row: dict[str, Any] = {"trial": i, "question": q.question, "honest_role": honest_side}
        for key, j in (("debate", result), ("direct", direct), ("baseline", base)):
            winner = j.winner
            ties[key] += winner == "tie"
            undecided[key] += winner == "undecided"
            counts[key] += winner == honest_side
            row[f"{key}_winner"] = winner
            row[f"{key}_correct"] = winner == honest_side
        row["judge_confidence"] = result.judge_confidence
        row["direct_confidence"] = direct.confidence
        if result.judge_confidence is not None:
            confidences.append(result.judge_confidence)
        row["rationale"] = result.rationale
        row["arguments"] = [asdict(a) for a in result.arguments]
        if out is not None:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            out.flush()
        if progress is not None:
            progress(i + 1, trials)
    return {
        "trials": trials,
        "rounds": rounds,
        "max_tokens": max_tokens,
        "seed": seed,
        "backend": backend.name,
        "honest_as_proposer": honest_proposer,
        "seconds": round(time.perf_counter() - t0, 1),
        "mean_judge_confidence": sum(confidences) / len(confidences) if confidences else None,
        "rates": {k: asdict(_rate(counts[k], trials)) for k in counts},
        "ties": ties,
        "undecided": undecided,
    }


def summary_table(s: dict[str, Any]) -> str:
    """The summary as a Markdown table (what docs/debate.md shows)."""
    names = {
        "debate": "honest win rate = judge accuracy with debate",
        "direct": "judge accuracy without debate (direct)",
        "baseline": "baseline judge (length) on the debate",
    }
    lines = ["| measure | correct / n | rate | 95 % Wilson | ties | undecided |", "|---|---|---|---|---|---|"]
    for k, label in names.items():
        r = s["rates"][k]
        lines.append(
            f"| {label} | {r['correct']} / {r['n']} | {r['correct'] / r['n']:.3f} | "
            f"[{r['low']:.3f}, {r['high']:.3f}] | {s['ties'][k]} | {s['undecided'][k]} |"
        )
    return "\n".join(lines)
