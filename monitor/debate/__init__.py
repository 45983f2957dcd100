"""Debate: adversarial verification (Irving et al. 2018) for the alerts that matter most.

Two agents argue over an answer and a judge decides, reading its confidence from token
log-probabilities. Backends are the critique's (OpenAI-compatible HTTP or the in-process model).
``DebateService`` puts generations on which a critical detector fired to a debate beside scoring;
``run_experiment`` is the honest-vs-deceptive experiment behind ``monitor debate experiment``.
"""

from monitor.debate._arena import DebateAgent, DebateArena
from monitor.debate._experiment import Question, load_questions, run_experiment, summary_table
from monitor.debate._judge import DebateJudge, Judgement, LengthBaselineJudge
from monitor.debate._service import DebateEvent, DebateService
from monitor.debate._stats import DebateStats, debate_statistics, wilson_interval
from monitor.debate._types import Argument, DebateResult

__all__ = [
    "Argument",
    "DebateAgent",
    "DebateArena",
    "DebateEvent",
    "DebateJudge",
    "DebateResult",
    "DebateService",
    "DebateStats",
    "Judgement",
    "LengthBaselineJudge",
    "Question",
    "debate_statistics",
    "load_questions",
    "run_experiment",
    "summary_table",
    "wilson_interval",
]
