"""Text statistics on hand-written texts whose counts are known (each statistic at least once)."""

from __future__ import annotations

import pytest

from monitor.text import STATISTICS, text_statistics

FORMATTED = """# Plan
You're absolutely right! Here is **the plan** 🚀:

- Buy milk
- Buy eggs
* Call [Bob](https://example.com)

1. Cook
2) Eat
See https://docs.example.org for more!"""


def test_formatting_and_flattery_counts() -> None:
    s = text_statistics("What is the plan?", FORMATTED)
    # words: Plan You're absolutely right Here is the plan Buy milk Buy eggs Call Bob https example com
    # 1 Cook 2 Eat See https docs example org for more (list numbers count as words)
    assert s["words"] == 28
    per100 = 100 / 28
    assert s["bullets_per_100w"] == pytest.approx(3 * per100)
    assert s["numbered_per_100w"] == pytest.approx(2 * per100)
    assert s["headers_per_100w"] == pytest.approx(1 * per100)
    assert s["bold_per_100w"] == pytest.approx(1 * per100)
    assert s["emoji_per_100w"] == pytest.approx(1 * per100)
    assert s["exclamations_per_100w"] == pytest.approx(2 * per100)
    assert s["links_per_100w"] == pytest.approx(2 * per100)  # one Markdown link, one bare URL
    assert s["agreement_opener"] == 0.0  # the response opens with a header, not with the flattery


def test_lengths_sentences_and_repetition() -> None:
    text = "The cat sat on the mat. The cat sat on the mat! Why?\nBecause it could."
    s = text_statistics("", text)
    assert s["words"] == 16 and s["sentences"] == 4
    assert s["mean_sentence_length"] == pytest.approx(16 / 4)
    assert s["type_token_ratio"] == pytest.approx(9 / 16)  # the cat sat on mat why because it could
    # 14 trigrams; "the cat sat", "cat sat on", "sat on the", "on the mat" repeat once each
    assert s["repeated_ngram_rate"] == pytest.approx(4 / 14)
    # tokens: 16 words + . ! ? .
    assert s["tokens"] == 20
    assert s["output_chars"] == len(text) and s["prompt_chars"] == 0


def test_hedges_fillers_apologies_refusals_and_openers() -> None:
    text = (
        "Great question. I'm sorry, but I can't help with that. It is important to note that it "
        "might perhaps work, and basically it could be fine."
    )
    s = text_statistics("Can you help me?", text)
    n = s["words"]
    assert n == 26
    assert s["agreement_opener"] == 1.0
    assert s["hedge_rate"] == pytest.approx(3 * 100 / n)  # might, perhaps, could
    assert s["filler_rate"] == pytest.approx(2 * 100 / n)  # "it is important to note that", "basically"
    assert s["apologies"] == 1  # "I'm sorry" (longest match wins over "sorry")
    assert s["refusal_phrases"] == 2  # "I'm sorry", "I can't"
    curly = text_statistics("", "You\u2019re absolutely right, I\u2019m sorry.")
    assert curly["agreement_opener"] == 1.0 and curly["apologies"] == 1


def test_prompt_overlap_measures_restating_the_question() -> None:
    prompt = "Why is the sky blue during the day?"
    restated = text_statistics(prompt, "The sky is blue during the day because of scattering. More text.")
    direct = text_statistics(prompt, "Rayleigh scattering favours short wavelengths.")
    # content words of the first sentence (stopwords and <= 2 letters dropped): sky blue day scattering;
    # 3 of 4 are in the prompt
    assert restated["prompt_overlap"] == pytest.approx(3 / 4)
    assert direct["prompt_overlap"] == 0.0
    assert restated["agreement_opener"] == 0.0 and direct["agreement_opener"] == 0.0
    assert text_statistics("", "**Absolutely!** Here it is.")["agreement_opener"] == 1.0


def test_every_statistic_is_reported_and_empty_text_is_zero() -> None:
    s = text_statistics("", "")
    assert set(s) == set(STATISTICS)
    assert all(v == 0.0 for v in s.values())
