"""Benchmark: the cost of all text statistics for one ~400-token answer, next to textstat.

The peer, textstat (the readability library LangKit builds on), computes different statistics
(readability scores), so the comparison is of cost per response, not of outputs. Both run on the
same texts in the same process: answers of the default demo prompts padded out to about
400 tokens with Markdown formatting, hedges and flattery. Run: ``python bench/text_stats.py``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from monitor.text import text_statistics

PROMPTS = Path(__file__).resolve().parents[1] / "data" / "demo" / "prompts.jsonl"
PARAGRAPH = (
    "Great question! It is important to note that the answer might depend on context, and I think it "
    "could perhaps vary. Here is a summary:\n\n## Key points\n- **First**, the basics matter.\n"
    "- Second, you should check the details 🚀.\n1. Read the docs at https://example.com.\n"
    "2) Try it yourself! Basically, it is usually fine, but results may differ somewhat.\n\n"
)


def answers(n: int) -> list[tuple[str, str]]:
    """``n`` distinct answers (textstat caches per text, so no text may repeat)."""
    prompts = [json.loads(x)["prompt"] for x in PROMPTS.read_text().splitlines()]
    parts = PARAGRAPH.split("\n")
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        lines = [parts[j] for j in rng.integers(0, len(parts), size=27)]
        body = "\n".join(f"{line} (note {i}-{k})" if line else line for k, line in enumerate(lines))
        out.append((prompts[i % len(prompts)], f"{prompts[i % len(prompts)]} {body}"))
    return out


def textstat_all(text: str) -> dict[str, float]:
    import textstat
    from textstat.backend.counts import _count_syllables

    # textstat >= 0.7.12 downloads NLTK's cmudict on first use, which an offline machine cannot;
    # with no dictionary it counts syllables with pyphen (its earlier behaviour).
    _count_syllables.get_cmudict = lambda lang: None  # type: ignore[assignment]

    return {
        "flesch_reading_ease": textstat.flesch_reading_ease(text),
        "flesch_kincaid_grade": textstat.flesch_kincaid_grade(text),
        "gunning_fog": textstat.gunning_fog(text),
        "lexicon_count": textstat.lexicon_count(text),
        "sentence_count": textstat.sentence_count(text),
        "syllable_count": textstat.syllable_count(text),
        "difficult_words": textstat.difficult_words(text),
    }


def timed(fn: object, items: list[tuple[str, str]]) -> list[float]:
    out = []
    for prompt, text in items:
        t0 = time.perf_counter()
        fn(prompt, text)  # type: ignore[operator]
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=500)
    ns = parser.parse_args()
    items = answers(ns.n)
    tokens = np.mean([text_statistics(p, t)["tokens"] for p, t in items])
    ours = timed(text_statistics, items)
    try:
        import textstat  # noqa: F401
    except ImportError:
        print("textstat is not installed (pip install textstat): no peer figure")
        peer = None
    else:
        peer = timed(lambda _p, t: textstat_all(t), items)
    stats = len(text_statistics(*items[0]))
    print(f"{ns.n} distinct answers of ~{tokens:.0f} tokens each")
    p50, p99 = np.median(ours) * 1e6, np.percentile(ours, 99) * 1e6
    print(f"monitor.text: {stats} statistics, p50 {p50:.0f} us, p99 {p99:.0f} us")
    if peer is not None:
        print(
            f"textstat:     7 readability statistics, p50 {np.median(peer) * 1e6:.0f} us, "
            f"p99 {np.percentile(peer, 99) * 1e6:.0f} us"
        )
        print(f"ratio monitor.text / textstat (p50): {np.median(ours) / np.median(peer):.2f}")


if __name__ == "__main__":
    main()
