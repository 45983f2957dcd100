"""Constitutional-AI critique: a constitution, critic backends (OpenAI-compatible HTTP or the
in-process model), fast (yes/no log-probability) and full (parsed critique) modes, the revision
loop that writes preference pairs, and the bounded critique service beside scoring."""

from monitor.critique._backends import ChatReply, CriticUnavailable, InProcessBackend, OpenAIChatBackend
from monitor.critique._constitution import DEFAULT_CONSTITUTION, Constitution, Principle
from monitor.critique._critic import MODES, Critic, Verdict, parse_full, read_yes_no
from monitor.critique._revise import PreferenceLog, RevisionOutcome, revise_until_clean
from monitor.critique._service import CritiqueEvent, CritiquePolicy, CritiqueService

__all__ = [
    "DEFAULT_CONSTITUTION",
    "MODES",
    "ChatReply",
    "Constitution",
    "Critic",
    "CriticUnavailable",
    "CritiqueEvent",
    "CritiquePolicy",
    "CritiqueService",
    "InProcessBackend",
    "OpenAIChatBackend",
    "PreferenceLog",
    "Principle",
    "RevisionOutcome",
    "Verdict",
    "parse_full",
    "read_yes_no",
    "revise_until_clean",
]
