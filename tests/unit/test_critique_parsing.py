"""Critic reply parsing and constitution validation on hand-written inputs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from monitor.critique import Constitution, parse_full, read_yes_no
from monitor.errors import ConfigError


def test_full_mode_replies_parse_or_fail_loudly() -> None:
    ok = parse_full("p", "VIOLATED: yes\nSEVERITY: High\nCRITIQUE: It helps a burglar.\nSUGGESTION: Decline.")
    assert (ok.violated, ok.severity, ok.critique, ok.suggestion, ok.parse_error) == (
        True,
        "high",
        "It helps a burglar.",
        "Decline.",
        "",
    )
    clean = parse_full("p", "Violated: no.\nCritique: fine")
    assert not clean.violated and clean.parse_error == "" and clean.critique == "fine"
    for text, error in (
        ("The response is bad.", "VIOLATED: expected yes or no"),
        ("VIOLATED: maybe", "VIOLATED: expected yes or no"),
        ("VIOLATED: yes\nSEVERITY: catastrophic", "SEVERITY: expected low, medium or high"),
    ):
        v = parse_full("p", text)
        assert v.parse_error == error and not (v.violated and v.severity) and v.raw == text


def test_yes_no_probability_from_first_token_logprobs() -> None:
    assert read_yes_no({"Yes": math.log(0.6), " yes": math.log(0.1), "No": math.log(0.1), "The": -0.1}) == (
        pytest.approx(0.875)
    )
    assert read_yes_no({"The": -0.1, "It": -2.0}) is None


def test_constitution_files_are_validated(tmp_path: Path) -> None:
    c = Constitution.load()
    assert {p.category for p in c.principles} == {"harmlessness", "helpfulness", "honesty"}
    assert {"least_harmful", "no_sycophancy", "no_needless_verbosity", "acknowledges_uncertainty"} <= set(c.by_id)
    with pytest.raises(ValueError, match="unknown ids"):
        c.select(["nope"])
    bad = tmp_path / "c.yaml"
    bad.write_text(
        "principles:\n  - id: a\n    category: kindness\n    statement: s\n    question: q\n"
        "    critique_prompt: c\n    revision_prompt: r\n"
    )
    with pytest.raises(ConfigError, match=r"principles\[0\].category: expected one of"):
        Constitution.load(bad)
    bad.write_text("principles:\n  - id: a\n    category: honesty\n")
    with pytest.raises(ConfigError, match=r"principles\[0\].statement: expected a non-empty string"):
        Constitution.load(bad)


class _EchoStandIn:
    """Answers every yes/no question "yes" and every revision request with the previous response.

    A stand-in: the real default model never echoes a response exactly (it reformats it), so the
    'unchanged' stop rule cannot be caused with it; everything else is tested on the real model.
    """

    name = "echo-stand-in"

    async def chat(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> Any:
        from monitor.critique import ChatReply

        if top_logprobs:
            return ChatReply("Yes", {"Yes": math.log(0.9), "No": math.log(0.1)})
        return ChatReply(messages[1]["content"] + "  ")  # the previous response, whitespace aside


def test_unchanged_stop_rule_with_an_echoing_stand_in_because_the_real_model_never_echoes() -> None:
    import asyncio

    from monitor.critique import Critic, revise_until_clean

    critic = Critic(_EchoStandIn(), mode="fast")
    out = asyncio.run(revise_until_clean(critic, "q", "the answer", principles=["least_harmful"]))
    assert out.stop_reason == "unchanged" and out.pairs == [] and out.final == "the answer"
    assert out.rounds[0][0].violated and out.rounds[0][0].severity == "high"  # P(yes) = 0.9
