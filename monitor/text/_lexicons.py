"""Phrase lists live in ``monitor/assets/lexicons/*.txt`` (data, not code): one phrase per line, ``#`` comments."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

LEXICONS = Path(__file__).resolve().parent.parent / "assets" / "lexicons"


@cache
def load_lexicon(name: str, folder: Path = LEXICONS) -> tuple[str, ...]:
    """The phrases of ``<name>.txt``, lower-cased, comments and blank lines dropped.

    >>> "i'm sorry" in load_lexicon("refusal")
    True
    """
    path = folder / f"{name}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"lexicon {name!r}: expected {path}")
    lines = (x.strip().lower() for x in path.read_text(encoding="utf-8").splitlines())
    return tuple(x for x in lines if x and not x.startswith("#"))


@cache
def load_words(name: str, folder: Path = LEXICONS) -> frozenset[str]:
    """A word list (several words per line allowed), as a set."""
    return frozenset(w for line in load_lexicon(name, folder) for w in line.split())


WORD = re.compile(r"[A-Za-z0-9]+(?:'[A-Za-z]+)*")


class PhraseIndex:
    """Counts phrase occurrences in a list of lower-cased words in one pass (first word -> phrases).

    Faster than one big regex alternation, and matches on word boundaries by construction: at each
    position the longest phrase wins and matching resumes after it.

    >>> idx = PhraseIndex(("i think", "think", "kind of"))
    >>> idx.count("i think it is kind of odd i think".split())
    3
    >>> idx.starts_with("think twice".split())
    True
    """

    def __init__(self, phrases: tuple[str, ...]) -> None:
        self._by_first: dict[str, list[tuple[str, ...]]] = {}
        for p in phrases:
            words = tuple(w.lower() for w in WORD.findall(p))
            if words:
                self._by_first.setdefault(words[0], []).append(words)
        for cands in self._by_first.values():
            cands.sort(key=len, reverse=True)

    def _match(self, words: list[str], i: int) -> int:
        for cand in self._by_first.get(words[i], ()):
            if tuple(words[i : i + len(cand)]) == cand:
                return len(cand)
        return 0

    def count(self, words: list[str]) -> int:
        n, i = 0, 0
        while i < len(words):
            step = self._match(words, i) if words[i] in self._by_first else 0
            n += step > 0
            i += step or 1
        return n

    def starts_with(self, words: list[str]) -> bool:
        return bool(words) and self._match(words, 0) > 0


@cache
def phrase_index(name: str) -> PhraseIndex:
    """The ``PhraseIndex`` of lexicon ``name``."""
    return PhraseIndex(load_lexicon(name))
