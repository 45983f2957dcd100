"""The debate protocol, judges, statistics and the escalation service, with scripted stand-in
backends (the model is exercised over HTTP in tests/integration/test_debate.py)."""

from __future__ import annotations

import asyncio
import io
import json
import math
from typing import Any

import pytest

from monitor.critique import ChatReply, CriticUnavailable
from monitor.critique._backends import _labels_from_top
from monitor.debate import (
    Argument,
    DebateAgent,
    DebateArena,
    DebateEvent,
    DebateJudge,
    DebateResult,
    DebateService,
    LengthBaselineJudge,
    Question,
    debate_statistics,
    run_experiment,
    summary_table,
    wilson_interval,
)
from monitor.metrics import MonitorMetrics


class ScriptedStandInBackend:
    """Stand-in backend: scripted agreement, numbered arguments, scripted judge label log-probs."""

    name = "scripted-stand-in"

    def __init__(self, p_yes: float | None = 0.1, labels: Any = None, fail_first: int = 0) -> None:
        self.p_yes = p_yes
        self.labels = labels if labels is not None else {"A": math.log(0.7), "B": math.log(0.3)}
        self.fail_first = fail_first
        self.chats: list[list[dict[str, str]]] = []
        self.judged: list[list[dict[str, str]]] = []

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply:
        self.chats.append(messages)
        if self.fail_first:
            self.fail_first -= 1
            raise RuntimeError("scripted failure")
        if top_logprobs:
            if self.p_yes is None:
                return ChatReply("maybe", {"maybe": -0.1})
            return ChatReply("yes", {"yes": math.log(self.p_yes), "no": math.log(1 - self.p_yes)})
        return ChatReply(f"argument {len(self.chats)}")

    async def label_logprobs(self, messages: list[dict[str, str]], labels: list[str]) -> dict[str, float]:
        self.judged.append(messages)
        return dict(self.labels(messages)) if callable(self.labels) else dict(self.labels)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def agents(backend: Any, **opponent: Any) -> tuple[DebateAgent, DebateAgent]:
    return DebateAgent("p", backend, stance="Paris"), DebateAgent("o", backend, **opponent)


def test_agreement_ends_the_debate_without_rounds_or_judge() -> None:
    b = ScriptedStandInBackend(p_yes=0.9)
    result = run(DebateArena(DebateJudge(b), max_rounds=3).debate("Capital of France?", *agents(b)))
    assert result.agreed and result.winner == "proposer" and result.winning_answer == "Paris"
    assert result.rounds == 0 and result.judge_confidence is None
    assert [a.role for a in result.arguments] == ["proposer", "opponent"]
    assert result.arguments[1].confidence == pytest.approx(0.9)
    assert len(b.chats) == 1 and b.judged == []  # one yes/no question, no arguments, no judge


def test_an_unreadable_agreement_is_a_challenge_not_a_silent_agreement() -> None:
    b = ScriptedStandInBackend(p_yes=None)
    result = run(DebateArena(DebateJudge(b, both_orders=False), max_rounds=1).debate("Q?", *agents(b)))
    assert not result.agreed and result.rounds == 1 and result.arguments[1].confidence is None


def test_rounds_are_bounded_and_alternate() -> None:
    b = ScriptedStandInBackend(p_yes=0.2)
    result = run(DebateArena(DebateJudge(b, both_orders=False), max_rounds=3).debate("Q?", *agents(b)))
    debate = result.arguments[2:]
    assert [(a.role, a.round) for a in debate] == [(r, n) for n in (1, 2, 3) for r in ("proposer", "opponent")]
    # 1 yes/no + 1 counter-answer + 6 arguments, and one judge call (one order)
    assert len(b.chats) == 8 and len(b.judged) == 1
    assert result.rounds == 3 and result.winner == "proposer"
    assert result.judge_confidence == pytest.approx(0.7)  # from the log-probs, never from length
    # the proposer's second argument replies to the opponent's first (chat 4 = argument 4)
    assert debate[1].content == "argument 4" and "Their latest argument: argument 4" in b.chats[4][1]["content"]


def test_zero_rounds_goes_straight_to_the_judge() -> None:
    b = ScriptedStandInBackend(p_yes=0.2)
    result = run(DebateArena(DebateJudge(b, both_orders=False), max_rounds=0).debate("Q?", *agents(b)))
    assert result.rounds == 0 and len(result.arguments) == 2 and len(b.judged) == 1


def test_a_judge_that_always_says_a_is_a_tie_when_both_orders_are_read() -> None:
    b = ScriptedStandInBackend(p_yes=0.2)  # 0.7 for "A" whatever A is
    result = run(DebateArena(DebateJudge(b), max_rounds=1).debate("Q?", *agents(b)))
    assert len(b.judged) == 2 and result.winner == "tie" and result.winning_answer == ""
    assert result.judge_confidence == 0.5


def test_unparseable_judge_replies_are_undecided_and_counted() -> None:
    b = ScriptedStandInBackend(p_yes=0.2, labels={})
    arena = DebateArena(DebateJudge(b), max_rounds=1)
    undecided = run(arena.debate("Q?", *agents(b)))
    assert undecided.winner == "undecided" and undecided.judge_confidence is None
    assert undecided.winning_answer == "" and "no A/B label" in undecided.rationale
    agreed = run(arena.debate("Q?", *agents(ScriptedStandInBackend(p_yes=0.9))))
    decided = run(
        DebateArena(DebateJudge(ScriptedStandInBackend(), both_orders=False), 2).debate(
            "Q?", *agents(ScriptedStandInBackend())
        )
    )
    stats = debate_statistics([undecided, agreed, decided, undecided])
    assert stats.debates == 4 and stats.undecided == 2 and stats.ties == 0 and stats.agreed == 1
    assert stats.proposer_share == 0.5 and stats.opponent_share == 0.0
    assert stats.mean_judge_confidence == pytest.approx(0.7) and stats.mean_rounds == pytest.approx(1.0)


def test_the_tie_margin_and_the_label_that_is_only_half_reported() -> None:
    near = ScriptedStandInBackend(p_yes=0.2, labels={"A": math.log(0.52), "B": math.log(0.48)})
    judge = DebateJudge(near, tie_margin=0.05, both_orders=False)
    assert run(judge.judge("Q?", "x", "y")).winner == "tie"
    only_b = ScriptedStandInBackend(labels={"B": math.log(0.4)})
    j = run(DebateJudge(only_b, both_orders=False).judge("Q?", "x", "y"))
    assert j.winner == "opponent" and j.confidence == 1.0  # B reported, A absent from the top tokens
    with pytest.raises(ValueError, match="tie_margin"):
        DebateJudge(near, tie_margin=1.5)


def test_openai_labels_are_summed_over_spellings_and_absent_when_missing() -> None:
    top = {" A": math.log(0.3), "A": math.log(0.2), "B": math.log(0.1), "The": math.log(0.3)}
    out = _labels_from_top(top, ["A", "B", "C"])
    assert math.exp(out["A"]) == pytest.approx(0.5) and math.exp(out["B"]) == pytest.approx(0.1)
    assert "C" not in out


def test_length_baseline_counts_words_and_calls_equal_length_a_tie() -> None:
    args = (Argument("proposer", "one two", round=1), Argument("opponent", "one two three four", round=1))
    j = run(LengthBaselineJudge().judge("Q?", "a b", "c", args))
    assert j.winner == "opponent" and j.p_proposer == pytest.approx(4 / 9)
    assert run(LengthBaselineJudge().judge("Q?", "a b", "c d")).winner == "tie"


def test_wilson_interval() -> None:
    low, high = wilson_interval(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(70, 100)
    assert low == pytest.approx(0.6041, abs=1e-4) and high == pytest.approx(0.7810, abs=1e-4)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(11, 10)


def test_experiment_scores_a_judge_that_knows_the_truth_and_randomises_roles() -> None:
    # the true answer is one word longer on even questions, the false one on odd questions
    questions = [
        Question(f"Q{i}?", f"true {i}" + " indeed" * (i % 2 == 0), f"false {i}" + " indeed" * (i % 2 == 1))
        for i in range(20)
    ]

    def truthful(messages: list[dict[str, str]]) -> dict[str, float]:
        text = messages[-1]["content"]
        a_true = "Answer A: true" in text
        return {"A": math.log(0.9 if a_true else 0.1), "B": math.log(0.1 if a_true else 0.9)}

    b = ScriptedStandInBackend(labels=truthful)
    out = io.StringIO()
    s = run(run_experiment(b, b, questions, trials=20, rounds=1, seed=3, out=out))
    rows = [json.loads(x) for x in out.getvalue().splitlines()]
    assert len(rows) == 20 and len({r["question"] for r in rows}) == 20  # without replacement
    assert s["rates"]["debate"]["correct"] == 20 and s["rates"]["direct"]["correct"] == 20
    assert 0 < s["honest_as_proposer"] < 20
    assert s["honest_as_proposer"] == sum(r["honest_role"] == "proposer" for r in rows)
    assert s["rates"]["debate"]["low"] == pytest.approx(wilson_interval(20, 20)[0])
    # the scripted arguments are equally long, so the length baseline picks the longer answer: right on
    # the 10 even questions, wrong on the 10 odd ones, whichever role the honest agent drew
    assert (s["rates"]["baseline"]["correct"], s["ties"]["baseline"]) == (10, 0)
    assert "| honest win rate" in summary_table(s)


def test_debate_event_keeps_only_critical_detectors_that_fired() -> None:
    class D:
        def __init__(self, name: str, critical: bool, fired: bool) -> None:
            self.name, self.critical, self.fired, self.score = name, critical, fired, 1.23456789

    ev = DebateEvent.from_detectors("r", "p", "o", [D("a", True, True), D("b", False, True), D("c", True, False)])
    assert ev.fired == {"a": 1.23457}


def test_service_drops_when_full_and_its_worker_survives_exceptions() -> None:
    metrics = MonitorMetrics()
    records: list[dict[str, Any]] = []

    def against_the_output(messages: list[dict[str, str]]) -> dict[str, float]:
        a_is_output = "Answer A: o\n" in messages[-1]["content"]
        return {"A": math.log(0.2 if a_is_output else 0.8), "B": math.log(0.8 if a_is_output else 0.2)}

    backend = ScriptedStandInBackend(p_yes=0.2, labels=against_the_output, fail_first=1)

    async def go() -> DebateService:
        svc = DebateService(backend, rounds=1, max_queue=2, metrics=metrics, on_result=records.append)
        assert not svc.offer(DebateEvent("early", "p", "o", {"d": 1.0}))  # not started
        await svc.start()
        assert not svc.offer(DebateEvent("quiet", "p", "o", {}))  # no critical detector fired
        accepted = [svc.offer(DebateEvent(f"r{i}", "p", "o", {"d": 1.0})) for i in range(5)]
        assert accepted == [True, True, False, False, False]
        for _ in range(200):
            if svc.done == 2:
                break
            await asyncio.sleep(0.01)
        assert svc.offer(DebateEvent("after", "p", "o", {"d": 1.0}))
        for _ in range(200):
            if svc.done == 3:
                break
            await asyncio.sleep(0.01)
        await svc.stop()
        return svc

    svc = run(go())
    assert svc.dropped == 3 and svc.errors == 1 and svc.done == 3
    assert metrics.debate_dropped._value.get() == 3
    assert metrics.debate_errors.labels("exception")._value.get() == 1
    assert metrics.debate_verdicts.labels("alert")._value.get() == 2  # the challenger's answer won
    assert [r["request_id"] for r in records] == ["r1", "after"]
    assert records[0]["verdict"] == "alert" and records[0]["detectors"] == {"d": 1.0}
    assert records[0]["judge_confidence"] == pytest.approx(0.8)


def test_service_records_an_unavailable_backend() -> None:
    class Down(ScriptedStandInBackend):
        async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> ChatReply:
            raise CriticUnavailable("down")

    records: list[dict[str, Any]] = []
    metrics = MonitorMetrics()

    async def go() -> None:
        svc = DebateService(Down(), metrics=metrics, on_result=records.append)
        await svc.start()
        svc.offer(DebateEvent("r", "p", "o", {"d": 1.0}))
        for _ in range(200):
            if svc.done:
                break
            await asyncio.sleep(0.01)
        await svc.stop()

    run(go())
    assert records == [
        {"type": "debate", "request_id": "r", "detectors": {"d": 1.0}, "outcome": "unavailable", "error": "down",
         "seconds": records[0]["seconds"]}
    ]  # fmt: skip
    assert metrics.debate_errors.labels("unavailable")._value.get() == 1


def test_result_fields_follow_the_seed() -> None:
    fields = set(DebateResult.__dataclass_fields__)
    assert {"winner", "winning_answer", "judge_confidence", "rounds", "arguments", "rationale"} <= fields
    assert {"role", "content", "evidence", "round", "confidence"} <= set(Argument.__dataclass_fields__)


def test_debate_settings_are_validated_and_reach_the_config() -> None:
    from monitor.cli import build_parser
    from monitor.config import load_config
    from monitor.errors import ConfigError

    cfg = load_config(env={"SAFETY_MONITOR_DEBATE_URL": "http://127.0.0.1:1", "SAFETY_MONITOR_DEBATE_ROUNDS": "2"})
    assert cfg.debate_url == "http://127.0.0.1:1" and cfg.debate_rounds == 2
    for key, bad in (("debate_rounds", -1), ("debate_timeout", 0), ("debate_queue", 0)):
        with pytest.raises(ConfigError, match=key):
            load_config(overrides={key: bad})
    ns = build_parser().parse_args(["serve", "--debate-url", "http://x"])
    assert ns.debate_url == "http://x"
    ns = build_parser().parse_args(["debate", "experiment", "--trials", "5", "--backend-url", "http://y"])
    assert ns.trials == 5 and ns.backend_url == "http://y" and ns.rounds == 1


def test_question_files_are_checked(tmp_path: Any) -> None:
    from monitor.debate import load_questions
    from monitor.errors import MonitorError

    bad = tmp_path / "q.csv"
    bad.write_text("Question,Answer\nWhy?,Because\n")
    with pytest.raises(MonitorError, match="Best Incorrect Answer"):
        load_questions(bad)
    with pytest.raises(MonitorError, match="--questions"):
        load_questions(tmp_path / "missing.csv")
    shipped = load_questions()
    assert len(shipped) == 200 and all(q.true_answer and q.false_answer for q in shipped)
