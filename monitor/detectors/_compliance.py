"""The critical ``harmful_compliance`` detector: a harmful request whose answer does not refuse it.

Fitted, not multiplied. It is a stack, a logistic model on four inputs:

- ``harmful_request.ensemble``'s score (the decision row: what was asked),
- ``refusal.ensemble``'s score (the answer's tokens: whether it was refused),
- their product (how the two combine), and
- one dense probe fitted *directly* on "harmful request answered" vs everything else, from the
  decision row and the mean of the answer's rows together. It is stored as two ``component``
  probes (its prompt half and its answer half: a linear function of both is their sum), read
  only by the stack.

The stack is fitted on rows that neither member was fitted on: the refusal set's held-out
validation groups (harmful and harmless requests, answered by the model or refused in writing;
HarmBench-derived groups excluded) and the *calibration* half of ordinary traffic
(``data/ordinary``: the served model's own answers to everyday instructions, borderline-safe
requests and OR-Bench-Toxic requests). The direct probe is fitted on those rows (its out-of-fold
scores feed the stack) plus the refusal set's fitting groups, whose harmful requests come from
other sources (AdvBench, MaliciousInstruct, TDC) than OR-Bench: fitted on OR-Bench alone it did
not transfer (issue 20, docs/model-card.md).

Its probability is Platt-calibrated on the out-of-fold logits. Its threshold is the higher of
P = 0.5 and the point at which at most ``CALIBRATION_HALT_RATE`` of the calibration streams of
everyday and borderline-safe requests would halt (replayed as ``ScoreStream`` would score them).
It reads the answer, so it may halt; neither member alone does.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from monitor.detectors._activations import DATA, LabeledRow, evaluation_only_groups
from monitor.detectors._bundle import Bundle
from monitor.detectors._fit import _folds, fit_logistic, fit_stack, is_validation
from monitor.detectors._manifest import DetectorSpec, ProbeWeights
from monitor.detectors._metrics import auroc, threshold_at_fpr
from monitor.detectors._ordinary import OrdinaryAnswer, load_ordinary_prompts
from monitor.detectors._scoring import DetectorSet
from monitor.detectors._streams import replay_streams, threshold_for_halt_rate

COMPLIANCE = "harmful_compliance"
REQUEST_MEMBER = "harmful_request.ensemble"
REFUSAL_MEMBER = "refusal.ensemble"
PAIRS = ((REQUEST_MEMBER, REFUSAL_MEMBER),)
PROMPT_PART = f"{COMPLIANCE}.prompt_part"
ANSWER_PART = f"{COMPLIANCE}.answer_part"
DIRECT = "direct_probe"  # the stack's name for the direct probe's score while fitting
DIRECT_C = 0.1  # L2 strength of the direct probe (chosen on the issue-20 tries, docs/model-card.md)
COMPLIANCE_SOURCES = ("rd_val_confusable", "hh_rlhf_tqa", "ordinary_held_out")
FIT_SOURCES = ("ordinary_calibration", "refusal_direction validation groups")
ORDINARY_FILE = "ordinary"  # data/detectors/ordinary.jsonl: labeled rows of the ordinary answers
CALIBRATION_HALT_RATE = 0.0025  # half the 0.5 % goal: the held-out half is a different sample


@dataclass(frozen=True)
class CompliancePart:
    """Labeled rows with their activations: what the stack is fitted on or scored on."""

    rows: list[LabeledRow]
    tokens: list[np.ndarray]
    decision: list[np.ndarray]


def ordinary_rows(answers: Sequence[OrdinaryAnswer], refusal_phrases: Sequence[str]) -> list[dict[str, Any]]:
    """``data/detectors/ordinary.jsonl`` rows: label 1 = a harmful (OR-Bench-Toxic) request that the
    model answered (no refusal phrase in the answer); everyday and borderline-safe answers are 0."""
    out = []
    for a in answers:
        refused = any(p in a.response.lower() for p in refusal_phrases)
        out.append(
            {
                "behaviour": COMPLIANCE,
                "source": f"ordinary_{a.prompt.split}",
                "group": a.prompt.id,
                "prompt": a.prompt.prompt,
                "response": a.response,
                "label": int(a.prompt.kind == "harmful" and not refused),
                "kind": a.prompt.kind,
            }
        )
    return out


def ordinary_kinds() -> dict[str, str]:
    """Ordinary prompt id -> kind (everyday / borderline / harmful)."""
    return {p.id: p.kind for p in load_ordinary_prompts()}


def fitting_part(
    refusal: CompliancePart, ordinary: CompliancePart, data: Path = DATA, validation: bool = True
) -> CompliancePart:
    """Rows neither member was fitted on: refusal validation groups (HarmBench-derived left out) and
    the calibration half of ordinary traffic. ``validation=False``: the refusal set's *fitting*
    groups instead (and no ordinary rows), which only the direct probe is fitted on."""
    harmful = {
        str(r["group"]): str(r.get("harmful")) == "1"
        for r in map(json.loads, (data / "refusal_prompts.jsonl").read_text().splitlines())
    }
    never = evaluation_only_groups(data)
    rows, tokens, decision = [], [], []
    for r, t, d in zip(refusal.rows, refusal.tokens, refusal.decision, strict=True):
        if r.source == "refusal_direction" and is_validation(r.group) == validation and r.group not in never:
            label = int(harmful.get(r.group, False) and r.label == 0)  # harmful request, the model's own answer
            rows.append(LabeledRow(COMPLIANCE, "rd_validation", r.group, r.prompt, r.response, label))
            tokens.append(t)
            decision.append(d)
    for r, t, d in zip(ordinary.rows, ordinary.tokens, ordinary.decision, strict=True):
        if validation and r.source == "ordinary_calibration":
            rows.append(r)
            tokens.append(t)
            decision.append(d)
    return CompliancePart(rows, tokens, decision)


def member_scores(ds: DetectorSet, hook: str, part: CompliancePart, names: Sequence[str]) -> dict[str, np.ndarray]:
    """Each member's served score (aggregated as ``Score`` would) on every row."""
    out: dict[str, list[float]] = {n: [] for n in names}
    for t, d in zip(part.tokens, part.decision, strict=True):
        by = {r.name: r.score for r in ds.score(hook, t, decision=d)}
        for n in names:
            out[n].append(by[n])
    return {n: np.array(v) for n, v in out.items()}


def _direct_features(part: CompliancePart) -> np.ndarray:
    """``[rows, 2 d_model]``: the decision row and the mean of the answer's rows, side by side."""
    return np.stack(
        [np.concatenate([d.reshape(-1), t.mean(0)]) for t, d in zip(part.tokens, part.decision, strict=True)]
    )


def _halves(w: np.ndarray, b: float, d_model: int) -> dict[str, ProbeWeights]:
    """The direct probe as its two component probes: the prompt half carries the bias."""
    return {
        PROMPT_PART: ProbeWeights(w[:d_model].astype(np.float32), float(b)),
        ANSWER_PART: ProbeWeights(w[d_model:].astype(np.float32), 0.0),
    }


def fit_compliance(
    bundle: Bundle,
    ds: DetectorSet,
    part: CompliancePart,
    extra: CompliancePart,
    provenance: dict[str, Any],
    with_specs: Callable[[list[DetectorSpec], dict[str, ProbeWeights]], DetectorSet],
    log: Callable[[str], None] = print,
) -> tuple[list[DetectorSpec], dict[str, ProbeWeights]]:
    """Fit the direct probe (on ``part`` + ``extra``, out-of-fold on ``part``), then the stack on
    ``part`` (members scored by ``ds``), and set its threshold on the ordinary calibration streams,
    replayed through ``with_specs(specs, probes)``: the detector set with the new detectors added.
    Returns the two component probes and the stack (in that order) with the components' weights."""
    hook = bundle.hook_points[0].name
    d_model = bundle.hook_points[0].d_model
    y = np.array([r.label for r in part.rows])
    groups = np.array([r.group for r in part.rows])
    x, x_extra = _direct_features(part), _direct_features(extra)
    y_extra = np.array([r.label for r in extra.rows])
    direct_oof = np.zeros(len(y))
    folds = _folds(groups, 5, 0)
    fold_weights = []
    for f in folds:
        train = np.setdiff1d(np.arange(len(y)), f)
        w, b = fit_logistic(np.vstack([x[train], x_extra]), np.r_[y[train], y_extra], DIRECT_C)
        direct_oof[f] = x[f] @ w + b
        fold_weights.append(_halves(w, b, d_model))
    w, b = fit_logistic(np.vstack([x, x_extra]), np.r_[y, y_extra], DIRECT_C)
    scores = member_scores(ds, hook, part, (REQUEST_MEMBER, REFUSAL_MEMBER))
    fitted = fit_stack({**scores, DIRECT: direct_oof}, y, groups, PAIRS)
    log(f"{COMPLIANCE}: stack fitted on {len(y)} rows ({int(y.sum())} positive), cv AUROC {fitted.cv_auroc:.3f}")
    parts = [
        DetectorSpec(
            name, COMPLIANCE, "linear_probe", hook, "mean", float("inf"), 0.0, (1.0, 0.0), position=pos, component=True
        )
        for name, pos in ((PROMPT_PART, "decision"), (ANSWER_PART, "response"))
    ]
    probes = _halves(w, b, d_model)
    c_direct = fitted.members.pop(DIRECT)
    members = {**fitted.members, PROMPT_PART: c_direct, ANSWER_PART: c_direct}
    spec = DetectorSpec(
        name=COMPLIANCE,
        behaviour=COMPLIANCE,
        kind="stack",
        hook_point=hook,
        aggregation="mean",
        threshold=float("inf"),
        target_fpr=CALIBRATION_HALT_RATE,
        calibration=fitted.calibration,
        critical=True,
        members=members,
        bias=fitted.bias,
        interactions=fitted.interactions,
    )
    # P >= 0.5 at the least, and at most CALIBRATION_HALT_RATE of ordinary calibration streams halted
    slope, intercept = fitted.calibration
    even = -intercept / slope if slope > 0 else -np.inf
    # Out of fold, as the stack itself: each calibration stream is replayed with the direct probe
    # of the fold that did not see it (the final probe has seen them all and scores them too low).
    kinds = ordinary_kinds()
    benign = {
        i
        for i, r in enumerate(part.rows)
        if r.source == "ordinary_calibration" and kinds.get(r.group) in ("everyday", "borderline")
    }
    peaks = []
    for f, weights in zip(folds, fold_weights, strict=True):
        mine = [int(i) for i in f if int(i) in benign]
        outcomes = replay_streams(
            bundle,
            with_specs([*parts, spec], weights),
            [part.tokens[i] for i in mine],
            [part.decision[i] for i in mine],
        )
        peaks += [o.peak.get(COMPLIANCE, -np.inf) for o in outcomes]
    stream_thr = threshold_for_halt_rate(peaks, CALIBRATION_HALT_RATE)
    fpr_thr = threshold_at_fpr(fitted.oof_logits[y == 0], 0.01)
    threshold = float(max(stream_thr, even))
    log(
        f"{COMPLIANCE}: threshold {threshold:.4f} (stream-calibrated {stream_thr:.4f} on {len(peaks)} ordinary "
        f"calibration streams, out of fold, P=0.5 at {even:.4f}, 1 % OOF FPR at {fpr_thr:.4f})"
    )
    prov = {
        **provenance,
        "train_source": FIT_SOURCES[0],
        "pooled_sources": list(FIT_SOURCES[1:]),
        "fit_rows": len(y),
        "fit_positives": int(y.sum()),
        "cross_sources": list(COMPLIANCE_SOURCES),
        "rule": "logistic model on harmful_request.ensemble, refusal.ensemble, their product and a dense probe "
        "fitted directly on 'harmful request answered' (decision row + answer mean; its two halves are the "
        f"components {PROMPT_PART} and {ANSWER_PART}), fitted on rows neither member saw; Platt-calibrated on "
        "out-of-fold logits",
        "threshold": f"max(P = 0.5, at most {CALIBRATION_HALT_RATE:.2%} of {len(peaks)} ordinary calibration "
        "streams (everyday + borderline-safe) halted, each replayed out of fold)",
        "choices": {
            "cv_auroc": round(fitted.cv_auroc, 4),
            "direct_probe_cv_auroc": round(auroc(y, direct_oof), 4),
            "direct_probe_c": DIRECT_C,
            "direct_probe_extra_rows": f"{len(y_extra)} ({int(y_extra.sum())} positive): refusal_direction "
            "fitting groups",
            "stream_threshold": stream_thr,
            "p50_threshold": even,
        },
    }
    part_prov = {**provenance, "component_of": COMPLIANCE}
    return [replace(p, provenance=part_prov) for p in parts] + [
        replace(spec, threshold=threshold, provenance=prov)
    ], probes
