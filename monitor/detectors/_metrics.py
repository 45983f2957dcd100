"""Detection metrics: AUROC, recall at a false-positive rate, rates at a fixed threshold.

AUROC is sklearn's (the ``model`` extra, which fitting and evaluation need anyway); the rates at a
threshold are a few lines of numpy, checked against sklearn by the unit tests.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); NaN when one class is missing.

    >>> round(auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.4, 0.35, 0.8])), 3)
    0.75
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(labels).astype(bool)
    if y.all() or not y.any():
        return float("nan")
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def threshold_at_fpr(negative_scores: np.ndarray, fpr: float) -> float:
    """The smallest score threshold whose false-positive rate on these negatives is at most ``fpr``.

    A score fires when ``score >= threshold``.

    >>> threshold_at_fpr(np.arange(100.0), 0.01)
    99.0
    """
    s = np.sort(np.asarray(negative_scores, dtype=np.float64))
    allowed = int(np.floor(fpr * len(s)))  # negatives allowed at or above the threshold
    if allowed >= len(s):
        return float(s[0])
    if allowed == 0:
        return float(np.nextafter(s[-1], np.inf))
    cand = s[len(s) - allowed]
    if len(s) - np.searchsorted(s, cand, "left") > allowed:  # ties at cand: go strictly above them
        cand = np.nextafter(cand, np.inf)
    return float(cand)


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    """Fraction of positives caught at the threshold that keeps this set's FPR at most ``fpr``."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    if not y.any() or y.all():
        return float("nan")
    return float((s[y] >= threshold_at_fpr(s[~y], fpr)).mean())


@dataclass(frozen=True)
class SplitMetrics:
    """Figures of one detector on one labeled split."""

    n: int
    positives: int
    auroc: float
    recall_at_1pct_fpr: float
    fpr_at_threshold: float  # with the bundle's shipped threshold
    recall_at_threshold: float
    ece: float = float("nan")  # expected calibration error of the reported probability (NaN: none reported)

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """ECE: the mean over equal-width probability bins of |observed rate - mean probability|,
    weighted by the bin's share of rows (0 = every probability is the frequency it claims).

    >>> round(expected_calibration_error(np.array([0, 1, 0, 1]), np.array([0.5, 0.5, 0.5, 0.5])), 3)
    0.0
    >>> round(expected_calibration_error(np.array([0, 0, 0, 0]), np.array([0.9, 0.9, 0.1, 0.1])), 3)
    0.5
    """
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    if len(y) == 0:
        return float("nan")
    which = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            total += m.sum() / len(y) * abs(y[m].mean() - p[m].mean())
    return float(total)


def split_metrics(
    labels: np.ndarray, scores: np.ndarray, threshold: float, probabilities: np.ndarray | None = None
) -> SplitMetrics:
    """All figures the model card reports for one (detector, split); ECE when probabilities are given."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    fired = s >= threshold
    return SplitMetrics(
        n=len(y),
        positives=int(y.sum()),
        auroc=auroc(y, s),
        recall_at_1pct_fpr=recall_at_fpr(y, s, 0.01),
        fpr_at_threshold=float(fired[~y].mean()) if (~y).any() else float("nan"),
        recall_at_threshold=float(fired[y].mean()) if y.any() else float("nan"),
        ece=float("nan") if probabilities is None else expected_calibration_error(y, probabilities),
    )
