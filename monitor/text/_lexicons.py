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


def load_words(name: str, folder: Path = LEXICONS) -> frozenset[str]:
    """A word list (several words per line allowed), as a set."""
    return frozenset(w for line in load_lexicon(name, folder) for w in line.split())


def phrase_pattern(phrases: tuple[str, ...]) -> re.Pattern[str]:
    """One case-insensitive regex matching any phrase on word boundaries (longest first).

    >>> len(phrase_pattern(("i think", "think")).findall("I think so; I THINK. think"))
    3
    """
    alts = sorted(phrases, key=len, reverse=True)
    body = "|".join(r"\s+".join(re.escape(w) for w in p.split()) for p in alts)
    return re.compile(rf"(?<![\w'])(?:{body})(?![\w'])", re.IGNORECASE)
