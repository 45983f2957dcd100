"""Text statistics of responses (length, repetition, hedging, formatting, flattery, refusals).

``text_statistics(prompt, output)`` returns every statistic in ``STATISTICS``; lexicons are data
files in ``monitor/assets/lexicons/``.
"""

from monitor.text._lexicons import PhraseIndex, load_lexicon, load_words, phrase_index
from monitor.text._stats import STATISTICS, text_statistics

__all__ = ["STATISTICS", "PhraseIndex", "load_lexicon", "load_words", "phrase_index", "text_statistics"]
