"""Fitting detectors: SAE probes, dense probes and their ensemble, calibrated at a target FPR.

For one behaviour: the rows of the training source are split by group into a fitting part and a
held-out validation part (``is_validation``, a hash of the group, so evaluation can rebuild it
without state). On the fitting part, grouped k-fold cross-validation picks hyper-parameters (SAE
latent count, L2 strength, token aggregation), produces out-of-fold scores from which the
threshold (at ``target_fpr`` on negatives), the Platt calibration and the ensemble's stacking
weights are set, and the final probes are refitted on all of it. Validation rows and the other
sources are never seen by any of this.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from monitor.detectors._activations import evaluation_only_groups
from monitor.detectors._metrics import auroc, threshold_at_fpr
from monitor.detectors._scoring import AGGREGATIONS, DetectorSpec, ProbeWeights

VALIDATION_FRACTION = 0.2


def is_validation(group: str) -> bool:
    """Whether a group belongs to the held-out validation split (a fixed 20 % by hash).

    >>> is_validation("repe-0"), is_validation("repe-1")
    (False, True)
    >>> 0.18 < sum(is_validation(f"g-{i}") for i in range(10000)) / 10000 < 0.22
    True
    """
    h = int.from_bytes(hashlib.sha256(group.encode()).digest()[:8], "little")
    return (h % 1000) < VALIDATION_FRACTION * 1000


@dataclass(frozen=True)
class FitConfig:
    """How detectors for one behaviour are fitted (defaults are what the default bundle used)."""

    behaviour: str
    train_source: str
    cross_sources: tuple[str, ...]
    diagnostic_sources: tuple[str, ...] = ()  # scored and reported, but outside the detector's scope
    # further sources fitted on with the training source (their own 20 % validation groups held out)
    pooled_sources: tuple[str, ...] = ()
    # other behaviours' rows (of their own fitting source) added to the fitting part as negatives
    negatives_from: tuple[str, ...] = ()
    hook_point: str = "blocks.16.hook_resid_post"
    folds: int = 5
    latent_counts: tuple[int, ...] = (8, 16, 32)
    sae_c: tuple[float, ...] = (0.01, 0.1, 1.0)
    dense_c: tuple[float, ...] = (0.001, 0.01, 0.1)
    selections: tuple[str, ...] = ("tstat", "l1")
    target_fpr: float = 0.01
    critical: bool = False
    seed: int = 0
    position: str = "response"  # "decision": rows are the one activation at the last prompt-template token
    data: str = ""  # the labeled file data/detectors/<data>.jsonl (default: the behaviour's name)

    @property
    def data_file(self) -> str:
        """Stem of the labeled file this behaviour is fitted and evaluated on."""
        return self.data or self.behaviour

    @property
    def fit_sources(self) -> tuple[str, ...]:
        """The training source and the sources pooled with it."""
        return (self.train_source, *self.pooled_sources)


@dataclass
class FittedBehaviour:
    """What fitting one behaviour produced: specs for the bundle, weights, chosen settings."""

    specs: list[DetectorSpec]
    probes: dict[str, ProbeWeights]
    latents: list[int]
    choices: dict[str, Any] = field(default_factory=dict)


def pool_tokens(tokens: Sequence[np.ndarray]) -> np.ndarray:
    """Mean over tokens of each row -> ``[rows, width]``."""
    return np.stack([t.mean(0) for t in tokens])


def sae_latent_means(sae: Any, tokens: Sequence[np.ndarray], batch: int = 4096) -> np.ndarray:
    """Mean SAE activation per row over its tokens, all latents (used to rank latents)."""
    flat = np.concatenate(tokens)
    lengths = np.array([len(t) for t in tokens])
    out = np.zeros((len(tokens), sae.cfg.d_sae), dtype=np.float32)
    row_of = np.repeat(np.arange(len(tokens)), lengths)
    with torch.no_grad():
        for i in range(0, len(flat), batch):
            z = sae.encode(torch.from_numpy(flat[i : i + batch])).float().numpy()
            np.add.at(out, row_of[i : i + batch], z)
    out /= lengths[:, None]
    return out


def rank_latents(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Latents ordered by |difference of class means| / pooled std, most separating first."""
    m1, m0 = z[y == 1].mean(0), z[y == 0].mean(0)
    sd = np.sqrt(0.5 * (z[y == 1].var(0) + z[y == 0].var(0))) + 1e-6
    return np.argsort(-np.abs(m1 - m0) / sd, kind="stable")


def l1_rank_latents(z: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """Latents ordered by |weight| in the sparsest L1 logistic model that uses at least ``k`` of them.

    Unlike the univariate ranking this picks latents that separate the classes *together*.
    Falls back to ``rank_latents`` order for the rest when L1 keeps fewer than ``k``.
    """
    from sklearn.linear_model import LogisticRegression

    live = np.flatnonzero(z.std(0) > 0)
    zs = (z[:, live] - z[:, live].mean(0)) / z[:, live].std(0)
    coef = np.zeros(len(live))
    for c in (0.003, 0.01, 0.03, 0.1, 0.3, 1.0):
        clf = LogisticRegression(l1_ratio=1.0, solver="liblinear", C=c, max_iter=2000, random_state=0)
        coef = clf.fit(zs, y).coef_[0]
        if np.count_nonzero(coef) >= k:
            break
    chosen = [int(live[i]) for i in np.argsort(-np.abs(coef), kind="stable") if coef[i] != 0][:k]
    rest = [int(i) for i in rank_latents(z, y) if int(i) not in set(chosen)]
    return np.array(chosen + rest)


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float) -> tuple[np.ndarray, float]:
    """L2 logistic regression on standardized inputs, folded back to raw inputs: ``x @ w + b`` is the logit."""
    from sklearn.linear_model import LogisticRegression

    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=5000).fit((x - mu) / sd, y)
    w = clf.coef_[0] / sd
    b = float(clf.intercept_[0] - (clf.coef_[0] * mu / sd).sum())
    return w.astype(np.float32), b


def aggregate(token_scores: Sequence[np.ndarray], how: str) -> np.ndarray:
    """One score per row: mean or max of its per-token scores."""
    f: Callable[[np.ndarray], float] = (lambda s: float(s.mean())) if how == "mean" else (lambda s: float(s.max()))
    return np.array([f(s) for s in token_scores])


def _folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Validation indices of ``k`` folds that never split a group (sklearn's shuffled GroupKFold)."""
    from sklearn.model_selection import GroupKFold

    gkf = GroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [test for _, test in gkf.split(np.zeros(len(groups)), groups=groups)]


def platt(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept mapping a score to a probability (fitted on out-of-fold scores)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1e4, max_iter=5000).fit(scores.reshape(-1, 1), y)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


class _ProbeKind:
    """One probe kind's feature map and fit, shared by cross-validation and the final fit."""

    def __init__(
        self, name: str, tokens: Sequence[np.ndarray], sae: Any, latent_means: np.ndarray | None, dense: np.ndarray
    ):
        self.name, self.tokens, self.sae, self.latent_means, self.dense = name, tokens, sae, latent_means, dense
        self._ranks: dict[tuple[str, bytes], np.ndarray] = {}

    def ranking(self, idx: np.ndarray, y: np.ndarray, selection: str, k_max: int) -> np.ndarray:
        """Latent ranking on rows ``idx`` (cached: the CV grid reuses it for every C and k)."""
        key = (selection, idx.tobytes())
        if key not in self._ranks:
            assert self.latent_means is not None
            z, yy = self.latent_means[idx], y[idx]
            self._ranks[key] = l1_rank_latents(z, yy, k_max) if selection == "l1" else rank_latents(z, yy)
        return self._ranks[key]

    def fit(self, idx: np.ndarray, y: np.ndarray, c: float, k: int, selection: str = "tstat") -> ProbeWeights:
        if self.name == "linear_probe":
            w, b = fit_logistic(self.dense[idx], y[idx], c)
            return ProbeWeights(w, b)
        assert self.latent_means is not None
        ids = np.sort(self.ranking(idx, y, selection, max(32, k))[:k])
        w, b = fit_logistic(self.latent_means[idx][:, ids], y[idx], c)
        return ProbeWeights(w, b, ids.astype(np.int64))

    def token_scores(self, probe: ProbeWeights, idx: np.ndarray) -> list[np.ndarray]:
        if probe.latents is None:
            return [self.tokens[i] @ probe.weight + probe.bias for i in idx]
        from monitor.sae import SlicedEncoder

        enc = SlicedEncoder(self.sae, probe.latents.tolist())
        with torch.no_grad():
            return [enc.encode(torch.from_numpy(self.tokens[i])).numpy() @ probe.weight + probe.bias for i in idx]


def fit_behaviour(
    cfg: FitConfig,
    rows: Sequence[Any],
    tokens: Sequence[np.ndarray],
    sae: Any,
    log: Callable[[str], None] = print,
    never: frozenset[str] | None = None,
) -> FittedBehaviour:
    """Fit the sae_probe, linear_probe and ensemble for one behaviour on its training source
    (rows of the ``never`` groups left out; default: ``data/detectors``' evaluation-only groups).

    With ``sae=None`` (a hook point the bundle has no SAE for) only the linear probe is fitted,
    named ``<behaviour>.linear_probe@<hook point>`` so it sits beside the first hook point's.
    """
    y_all = np.array([r.label for r in rows])
    groups = np.array([r.group for r in rows])
    never = evaluation_only_groups() if never is None else never
    fit_idx = np.array(
        [
            i
            for i, r in enumerate(rows)
            if ((r.source in cfg.fit_sources and not is_validation(r.group)) or r.source.startswith("negatives:"))
            and r.group.removeprefix("neg-") not in never
        ]
    )
    if len(fit_idx) == 0:
        raise ValueError(f"{cfg.behaviour}: no rows of training source {cfg.train_source!r}")
    dense = pool_tokens(tokens)
    latent_means = None if sae is None else sae_latent_means(sae, [tokens[i] for i in range(len(tokens))])
    fitted_kinds = ("linear_probe",) if sae is None else ("sae_probe", "linear_probe")
    kinds = {n: _ProbeKind(n, tokens, sae, latent_means, dense) for n in fitted_kinds}
    suffix = f"@{cfg.hook_point}" if sae is None else ""
    folds = _folds(groups[fit_idx], cfg.folds, cfg.seed)
    grids: dict[str, list[dict[str, Any]]] = {
        "sae_probe": [
            {"c": c, "k": k, "selection": sel} for sel in cfg.selections for c in cfg.sae_c for k in cfg.latent_counts
        ],
        "linear_probe": [{"c": c, "k": 0} for c in cfg.dense_c],
    }
    y = y_all
    yf = y[fit_idx]
    chosen: dict[str, dict[str, Any]] = {}
    oof: dict[str, np.ndarray] = {}  # aggregated out-of-fold scores with the chosen settings
    oof_tokens: dict[str, list[np.ndarray]] = {}  # per-token out-of-fold scores, in fit_idx order
    for name, kind in kinds.items():
        best: tuple[float, dict[str, Any], list[np.ndarray]] | None = None
        for params in grids[name]:
            ts: list[np.ndarray] = [np.zeros(0)] * len(fit_idx)
            for f in folds:
                train = np.setdiff1d(np.arange(len(fit_idx)), f)
                for j, t in zip(f, kind.token_scores(kind.fit(fit_idx[train], y, **params), fit_idx[f]), strict=True):
                    ts[j] = t
            for how in AGGREGATIONS:
                a = auroc(yf, aggregate(ts, how))
                log(f"  {cfg.behaviour} {name} {params} {how}: cv AUROC {a:.3f}")
                if best is None or a > best[0] + 1e-9:
                    best = (a, {**params, "aggregation": how}, ts)
        assert best is not None
        chosen[name] = {**best[1], "cv_auroc": round(best[0], 4)}
        oof_tokens[name] = best[2]
        oof[name] = aggregate(best[2], best[1]["aggregation"])
    # Ensemble: a linear stack of the members' mean-aggregated out-of-fold scores, applied per token.
    members = ("sae_probe", "linear_probe")
    bias = 0.0
    if sae is not None:
        stack_x = np.stack([aggregate(oof_tokens[n], "mean") for n in members], 1)
        coef, bias = fit_logistic_raw(stack_x, yf)
        combined = [coef[0] * a + coef[1] * b + bias for a, b in zip(*(oof_tokens[n] for n in members), strict=True)]
        ens_how = max(AGGREGATIONS, key=lambda h: auroc(yf, aggregate(combined, h)))
        oof["ensemble"] = aggregate(combined, ens_how)
        chosen["ensemble"] = {
            "aggregation": ens_how,
            "cv_auroc": round(auroc(yf, oof["ensemble"]), 4),
            "stack": [float(coef[0]), float(coef[1])],
        }
    # Final fits, thresholds and calibration.
    probes: dict[str, ProbeWeights] = {}
    specs: list[DetectorSpec] = []
    beh = cfg.behaviour
    cut = int(VALIDATION_FRACTION * 1000)
    provenance = {
        "train_source": cfg.train_source,
        "pooled_sources": list(cfg.pooled_sources),
        "fit_rows": len(fit_idx),
        "fit_positives": int(yf.sum()),
        "negatives_from": [f"{b} ({sum(r.source == f'negatives:{b}' for r in rows)} rows)" for b in cfg.negatives_from],
        "validation": f"groups of {'+'.join(cfg.fit_sources)} with sha256(group) % 1000 < {cut}",
        "cross_sources": list(cfg.cross_sources),
        "diagnostic_sources": list(cfg.diagnostic_sources),
        "folds": cfg.folds,
    }
    for name, kind in kinds.items():
        params = {k: v for k, v in chosen[name].items() if k in ("c", "k", "selection")}
        probes[f"{beh}.{name}{suffix}"] = kind.fit(fit_idx, y, **params)
    for name in oof:
        s = oof[name]
        calibration = platt(s, yf)
        thr = threshold_at_fpr(s[yf == 0], cfg.target_fpr)
        if cfg.critical or cfg.position == "decision":
            # Critical and decision-row detectors also need probability >= 0.5: on separable fitting
            # data the 1 % point sits at the top of the negatives, far below the positives, and
            # the deception ensemble then fired on 31 % of the other source's honest prompts at P ~ 0.
            even = -calibration[1] / calibration[0] if calibration[0] > 0 else -np.inf
            thr = max(thr, float(even))
        extra: dict[str, Any] = {}
        if name == "ensemble":
            stack = chosen[name]["stack"]
            extra = {"members": {f"{beh}.sae_probe": stack[0], f"{beh}.linear_probe": stack[1]}, "bias": bias}
        specs.append(
            DetectorSpec(
                name=f"{beh}.{name}{suffix}",
                behaviour=beh,
                kind=name,
                hook_point=cfg.hook_point,
                aggregation=chosen[name]["aggregation"],
                threshold=thr,
                target_fpr=cfg.target_fpr,
                calibration=calibration,
                critical=cfg.critical and name == "ensemble",
                provenance={**provenance, "choices": chosen[name]},
                position=cfg.position,
                **extra,
            )
        )
    sae_probe = probes.get(f"{beh}.sae_probe")
    latents = [] if sae_probe is None else sorted(int(i) for i in sae_probe.latents)  # type: ignore[union-attr]
    return FittedBehaviour(specs, probes, latents, chosen)


def fit_logistic_raw(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Unregularised-ish logistic regression without standardisation (for the 2-input stack)."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1.0, max_iter=5000).fit(x, y)
    return clf.coef_[0].astype(np.float64), float(clf.intercept_[0])


@dataclass(frozen=True)
class FittedStack:
    """A logistic model on member detectors' aggregated scores (and products of pairs), with its
    out-of-fold logits (for the Platt map and thresholds) and cross-validated AUROC."""

    members: dict[str, float]
    interactions: tuple[tuple[str, str, float], ...]
    bias: float
    oof_logits: np.ndarray
    calibration: tuple[float, float]
    cv_auroc: float


def fit_stack(
    scores: dict[str, np.ndarray],
    y: np.ndarray,
    groups: np.ndarray,
    pairs: Sequence[tuple[str, str]] = (),
    c: float = 1.0,
    folds: int = 5,
    seed: int = 0,
) -> FittedStack:
    """Fit how detectors combine, instead of multiplying their probabilities as if independent.

    Features are the members' scores and the products of ``pairs``; L2 logistic regression on
    standardized features, folded back to raw scores. Out-of-fold logits (grouped folds) give
    the Platt calibration and the cross-validated AUROC.
    """
    names = list(scores)
    x = np.stack([scores[n] for n in names] + [scores[a] * scores[b] for a, b in pairs], 1)
    oof = np.zeros(len(y))
    for f in _folds(groups, folds, seed):
        train = np.setdiff1d(np.arange(len(y)), f)
        w, b = fit_logistic(x[train], y[train], c)
        oof[f] = x[f] @ w + b
    w, b = fit_logistic(x, y, c)
    return FittedStack(
        members={n: float(w[i]) for i, n in enumerate(names)},
        interactions=tuple((a, b_, float(w[len(names) + j])) for j, (a, b_) in enumerate(pairs)),
        bias=float(b),
        oof_logits=oof,
        calibration=platt(oof, y),
        cv_auroc=auroc(y, oof),
    )
