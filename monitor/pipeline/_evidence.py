"""What one generation's activations add up to: per-hook-point statistics and running detector scores.

``Evidence.fold`` is the one loop over activation blocks, for a finished generation (all its
blocks at once) and for a stream (one chunk's blocks at a time); ``fold_decision`` takes the rows
at the decision position. State is O(1) in the number of tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from monitor.detectors import Bundle, DetectorResult, DetectorSet
from monitor.errors import InvalidInput
from monitor.hook_points import HookStats
from monitor.pipeline._types import ActivationInput, Limits
from monitor.pipeline._validate import decode_block, finite_results

__all__ = ["Evidence"]


@dataclass
class _HookAccumulator:
    """Running sums for one hook point, so a stream's stats cost O(1) memory."""

    hook_point: str
    tokens: int = 0
    norm_sum: float = 0.0
    norm_max: float = 0.0
    normed: int = 0  # tokens with full activations (projected tokens have no residual norm)

    def add(self, tokens: int, norms: np.ndarray | None) -> None:
        self.tokens += tokens
        if norms is not None and norms.size:
            self.normed += int(norms.size)
            self.norm_sum += float(norms.sum(dtype=np.float64))
            self.norm_max = max(self.norm_max, float(norms.max()))

    def stats(self) -> HookStats:
        mean = self.norm_sum / self.normed if self.normed else 0.0
        return HookStats(self.hook_point, self.tokens, mean, self.norm_max)


class Evidence:
    """The activations of one generation so far, folded block by block.

    ``scope`` names what a hook point may appear once in ("request" or "chunk"), and
    ``max_tokens_total`` bounds the tokens over all folds (a stream's limit; None for one request).
    """

    def __init__(
        self,
        bundle: Bundle,
        detectors: DetectorSet,
        limits: Limits,
        scope: str,
        max_tokens_total: int | None = None,
    ) -> None:
        self._bundle = bundle
        self._detectors = detectors
        self._limits = limits
        self._scope = scope
        self._max_total = max_tokens_total
        self._accs: dict[str, _HookAccumulator] = {}
        self._running = detectors.open_running()
        self._decision_seen: set[str] = set()
        self.tokens_seen = 0  # the most tokens any hook point has received

    def fold(self, blocks: Sequence[ActivationInput]) -> tuple[dict[str, int], int]:
        """Validate, decode and score ``blocks``; returns the new tokens per hook point and the bytes."""
        new_tokens: dict[str, int] = {}
        nbytes = 0
        budget = None if self._max_total is None else self._max_total - self.tokens_seen
        for i, block in enumerate(blocks):
            field_name = f"activations[{i}]"
            hp, arr = decode_block(self._bundle, self._detectors, block, field_name, self._limits.max_tokens)
            if hp.name in new_tokens:
                raise InvalidInput(
                    f"{field_name}.hook_point",
                    f"each hook point at most once per {self._scope}",
                    f"{hp.name!r} repeated",
                    reason="hook_point",
                )
            if budget is not None and arr.shape[0] > budget:
                raise InvalidInput(
                    f"{field_name}.activations.shape[0] (tokens)",
                    f"at most {self._max_total} tokens per stream ({budget} left)",
                    str(arr.shape[0]),
                    reason="too_many_tokens",
                )
            acc = self._accs.setdefault(hp.name, _HookAccumulator(hp.name))
            acc.add(arr.shape[0], None if block.projected else _row_norms(arr))
            feats = self._detectors.features(hp.name, arr, block.projected)
            if feats is not None:
                self._running.update(hp.name, feats)
            new_tokens[hp.name] = int(arr.shape[0])
            nbytes += len(block.tensor.data)
        self.tokens_seen += max(new_tokens.values(), default=0)
        return new_tokens, nbytes

    @property
    def has_decision(self) -> bool:
        """Whether a decision row was folded (a 1-token answer has only that)."""
        return bool(self._decision_seen)

    def fold_decision(self, blocks: Sequence[ActivationInput]) -> int:
        """Validate the decision-position blocks (one row each, each hook point once) and score them;
        returns the bytes."""
        nbytes = 0
        for i, block in enumerate(blocks):
            field_name = f"decision[{i}]"
            hp, arr = decode_block(self._bundle, self._detectors, block, field_name, 1 << 30)
            if arr.shape[0] != 1:
                raise InvalidInput(
                    f"{field_name}.activations.shape[0] (tokens)",
                    "exactly 1 (the last prompt-template token)",
                    str(arr.shape[0]),
                    reason="decision",
                )
            if hp.name in self._decision_seen:
                raise InvalidInput(
                    f"{field_name}.hook_point",
                    "each hook point at most once per request or stream",
                    f"{hp.name!r} repeated",
                    reason="hook_point",
                )
            self._decision_seen.add(hp.name)
            feats = self._detectors.features(hp.name, arr, block.projected)
            if feats is not None:
                self._running.update_decision(hp.name, feats)
            nbytes += len(block.tensor.data)
        return nbytes

    def hook_stats(self) -> tuple[HookStats, ...]:
        return tuple(a.stats() for a in self._accs.values())

    def results(self) -> tuple[DetectorResult, ...]:
        """The detectors' verdicts so far; ``InvalidInput`` if an input drove one to NaN/Inf."""
        return finite_results(self._running.results())


def _row_norms(arr: np.ndarray) -> np.ndarray:
    return np.sqrt(np.einsum("ij,ij->i", arr, arr, dtype=np.float64))
