"""Per-response text statistics: length, repetition, hedging, formatting, flattery, refusals.

These are the reward-hacking signals of the seed documents (longer answers, more hedging, more
flattery, more bullet points, emoji) measured on every output with compiled regexes only. Rates
are per 100 words, so they do not simply follow length. Every statistic is a float in the dict
``text_statistics`` returns; ``STATISTICS`` lists them with what they mean.
"""

from __future__ import annotations

import re
from collections import Counter

from monitor.text._lexicons import WORD, load_words, phrase_index

STATISTICS: dict[str, str] = {
    "tokens": "word and punctuation tokens (\\w+ or one non-space symbol); not the model's tokenizer",
    "words": "words ([A-Za-z0-9]+ with inner apostrophes)",
    "sentences": "sentences (split after . ! ? or a line break; a fragment with a word counts)",
    "mean_sentence_length": "words per sentence",
    "type_token_ratio": "distinct words / words (lower-cased)",
    "repeated_ngram_rate": "fraction of word 3-grams that repeat an earlier 3-gram",
    "hedge_rate": "hedging phrases per 100 words (lexicon hedges.txt)",
    "filler_rate": "filler phrases per 100 words (lexicon fillers.txt)",
    "prompt_overlap": "fraction of the first sentence's content words that occur in the prompt (restating)",
    "bullets_per_100w": "lines starting with -, * or •, per 100 words",
    "numbered_per_100w": "lines starting with 1. or 1), per 100 words",
    "headers_per_100w": "Markdown headers (# to ######), per 100 words",
    "bold_per_100w": "**bold** or __bold__ spans, per 100 words",
    "emoji_per_100w": "emoji, per 100 words",
    "exclamations_per_100w": "exclamation marks, per 100 words",
    "links_per_100w": "URLs and Markdown links, per 100 words",
    "agreement_opener": "1 when the response opens with agreement or flattery (agreement_openers.txt)",
    "apologies": "apology phrases (apologies.txt)",
    "refusal_phrases": "refusal phrases (refusal.txt)",
    "output_chars": "characters of the response",
    "prompt_chars": "characters of the prompt",
}

_TOKEN = re.compile(r"\w+|[^\w\s]")
_WORD = WORD
_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")
_BULLET = re.compile(r"^[ \t]*[-*•][ \t]+\S", re.M)
_NUMBERED = re.compile(r"^[ \t]*\d{1,3}[.)][ \t]+\S", re.M)
_HEADER = re.compile(r"^[ \t]{0,3}#{1,6}[ \t]+\S", re.M)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
_EMOJI = re.compile(
    "[\U0001f300-\U0001f5ff\U0001f600-\U0001f64f\U0001f680-\U0001f6ff\U0001f900-\U0001f9ff"
    "\U0001fa70-\U0001faff\u2600-\u26ff\u2700-\u27bf\U0001f1e6-\U0001f1ff]"
)
_LINK = re.compile(r"\[[^\]\n]+\]\([^)\s]+\)|https?://\S+")


def text_statistics(prompt: str, output: str) -> dict[str, float]:
    """Every statistic of ``STATISTICS`` for one (prompt, response).

    >>> s = text_statistics("What is 2+2?", "Great question! It is probably 4.")
    >>> s["words"], s["sentences"], s["agreement_opener"], s["exclamations_per_100w"]
    (6.0, 2.0, 1.0, 16.666666666666668)
    """
    text = output.replace("\u2019", "'")
    words = _WORD.findall(text.lower())
    n_words = len(words)
    per100 = 100.0 / n_words if n_words else 0.0
    sentences = [s for s in _SENTENCE_SPLIT.split(text.strip()) if _WORD.search(s)]
    trigrams = list(zip(words, words[1:], words[2:], strict=False))
    repeats = sum(c - 1 for c in Counter(trigrams).values() if c > 1)
    return {
        "tokens": float(len(_TOKEN.findall(text))),
        "words": float(n_words),
        "sentences": float(len(sentences)),
        "mean_sentence_length": n_words / len(sentences) if sentences else 0.0,
        "type_token_ratio": len(set(words)) / n_words if n_words else 0.0,
        "repeated_ngram_rate": repeats / len(trigrams) if trigrams else 0.0,
        "hedge_rate": phrase_index("hedges").count(words) * per100,
        "filler_rate": phrase_index("fillers").count(words) * per100,
        "prompt_overlap": _overlap(prompt, sentences[0] if sentences else ""),
        "bullets_per_100w": len(_BULLET.findall(text)) * per100,
        "numbered_per_100w": len(_NUMBERED.findall(text)) * per100,
        "headers_per_100w": len(_HEADER.findall(text)) * per100,
        "bold_per_100w": len(_BOLD.findall(text)) * per100,
        "emoji_per_100w": len(_EMOJI.findall(text)) * per100,
        "exclamations_per_100w": text.count("!") * per100,
        "links_per_100w": len(_LINK.findall(text)) * per100,
        "agreement_opener": 1.0 if _opens_with_agreement(text, words) else 0.0,
        "apologies": float(phrase_index("apologies").count(words)),
        "refusal_phrases": float(phrase_index("refusal").count(words)),
        "output_chars": float(len(output)),
        "prompt_chars": float(len(prompt)),
    }


def _opens_with_agreement(text: str, words: list[str]) -> bool:
    """The response's first words are an agreement/flattery opener (a Markdown header first does not count)."""
    head = text.lstrip()[:1]
    return (head.isalnum() or head in "\"'*_") and phrase_index("agreement_openers").starts_with(words)


def _overlap(prompt: str, first_sentence: str) -> float:
    stop = load_words("stopwords")
    content = {w.lower() for w in _WORD.findall(first_sentence)} - stop  # already apostrophe-normalised
    content = {w for w in content if len(w) > 2}
    if not content:
        return 0.0
    in_prompt = {w.lower() for w in _WORD.findall(prompt.replace("\u2019", "'"))}
    return len(content & in_prompt) / len(content)
