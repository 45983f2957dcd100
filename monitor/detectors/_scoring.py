"""Serving-time detectors: one shared projection per hook point, per-token linear scores, aggregation.

Every detector kind reduces to a linear map over *projection columns*: the SAE latents the
bundle's SAE probes use (after the SAE's nonlinearity) and one raw direction per dense probe. An
ensemble is a linear stack of its members, so it is a linear map over the same columns. The cost
of scoring a token is therefore one ``[d_model, K]`` product with K = (latents used) + (dense
probes), whatever the SAE's width: that is the sliced path. A projected-mode client sends those K
pre-activations per token instead of d_model values.

A detector's score for a response is an aggregation (mean or max) of its per-token scores; a
stream also keeps an exponential moving average of them (``recent_score``) so a late turn towards
the behaviour is seen before the running mean catches up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.detectors._bundle import Bundle, BundleError
from monitor.detectors._manifest import (
    AGGREGATIONS,
    COMPOSITES,
    FEATURES_FILE,
    WEIGHTS_FILE,
    DetectorSpec,
    ProbeWeights,
    load_feature_reports,
    load_probe_weights,
    save_probe_weights,
)
from monitor.sae._config import SAEConfig
from monitor.sae._files import slice_encoder

# The manifest names are re-exported for the fitting modules that import them from here.
__all__ = [
    "AGGREGATIONS",
    "FEATURES_FILE",
    "WEIGHTS_FILE",
    "Contribution",
    "DetectorResult",
    "DetectorSet",
    "DetectorSpec",
    "HookProjection",
    "LinearDetector",
    "ProbeWeights",
    "RunningScores",
    "save_probe_weights",
    "stack_logit",
]


@dataclass(frozen=True)
class Contribution:
    """One SAE latent's share of a detector score: mean activation x weight, with its label."""

    latent: int
    activation: float
    contribution: float
    label: str
    example: str


@dataclass(frozen=True)
class DetectorResult:
    """A detector's verdict on one response (or on a stream so far)."""

    name: str
    behaviour: str
    kind: str
    score: float
    recent_score: float
    probability: float
    threshold: float
    fired: bool
    critical: bool
    top_features: tuple[Contribution, ...]
    tokens: int = 0  # tokens the verdict rests on
    halt_min_tokens: int = 8  # a stream may only be halted by this detector after this many tokens
    reads: str = "response"  # "prompt" (the decision row only), "response", or "prompt+response"

    @property
    def reads_answer(self) -> bool:
        """Whether the verdict rests on the answer's tokens: only such a detector may halt a stream."""
        return "response" in self.reads


@dataclass(frozen=True)
class LinearDetector:
    """A detector at run time: per-token score = features[:, cols] @ weight + bias.

    The first ``n_latent_cols`` of ``cols`` are SAE latents (``latent_ids``, contributions are
    reported for them); the rest are dense directions.
    """

    spec: DetectorSpec
    cols: np.ndarray
    weight: np.ndarray
    bias: float
    latent_ids: np.ndarray

    @property
    def n_latent_cols(self) -> int:
        return len(self.latent_ids)

    def latent_weights(self) -> list[tuple[int, float]]:
        """``(SAE latent id, weight)`` of each latent column, strongest first."""
        pairs = zip(self.latent_ids, self.weight[: self.n_latent_cols], strict=True)
        return sorted(((int(lat), float(w)) for lat, w in pairs), key=lambda p: -abs(p[1]))

    def token_scores(self, feats: np.ndarray) -> np.ndarray:
        """Per-token scores on feature rows ``[T, K]`` of this detector's hook point."""
        out: np.ndarray = feats[:, self.cols] @ self.weight + self.bias
        return out

    def result(
        self,
        score: float,
        recent: float,
        col_means: np.ndarray,
        tokens: int,
        reports: Mapping[int, Mapping[str, Any]],
    ) -> DetectorResult:
        """The verdict for an aggregated score, with the latents that pushed it up (largest first)."""
        spec = self.spec
        contribs = []
        for lat, c, w in zip(self.latent_ids, self.cols, self.weight, strict=False):
            value = float(col_means[c]) * float(w)
            if value > 0:
                rep = reports.get(int(lat), {})
                contribs.append(
                    Contribution(
                        int(lat), float(col_means[c]), value, str(rep.get("label", "")), str(rep.get("example", ""))
                    )
                )
        contribs.sort(key=lambda c: -c.contribution)
        return DetectorResult(
            reads="prompt" if spec.position == "decision" else "response",
            name=spec.name,
            behaviour=spec.behaviour,
            kind=spec.kind,
            score=score,
            recent_score=recent,
            probability=spec.probability(score),
            threshold=spec.threshold,
            fired=score >= spec.threshold,
            critical=spec.critical,
            top_features=tuple(contribs[:3]),
            tokens=tokens,
            halt_min_tokens=spec.halt_min_tokens,
        )


class HookProjection:
    """The shared ``[d_model, K]`` projection of one hook point: SAE latent columns, then dense columns."""

    def __init__(
        self,
        hook_point: str,
        d_model: int,
        sae: tuple[SAEConfig, Mapping[str, np.ndarray]] | None,
        latent_ids: Sequence[int],
        dense: Sequence[np.ndarray],
    ) -> None:
        self.hook_point = hook_point
        self.latent_ids = np.asarray(latent_ids, dtype=np.int64)
        k = len(self.latent_ids)
        w = np.zeros((d_model, k + len(dense)), dtype=np.float32)
        b = np.zeros(k + len(dense), dtype=np.float32)
        self.jump_threshold = np.zeros(k, dtype=np.float32)
        if k:
            if sae is None:
                raise BundleError(f"hook point {hook_point}: SAE probes need the bundle's sae, none loaded")
            if sae[0].architecture == "topk":
                raise BundleError(f"hook point {hook_point}: SAE probes over a TopK SAE cannot be sliced")
            enc = slice_encoder(sae[0], sae[1], self.latent_ids.tolist())
            w[:, :k], b[:k], self.jump_threshold = enc.W, enc.b, enc.threshold
        for j, vec in enumerate(dense):
            w[:, k + j] = vec
        self.w, self.b = w, b
        self.n_latents = k

    @property
    def width(self) -> int:
        """K: values per token a projected-mode client sends."""
        return int(self.w.shape[1])

    def project(self, x: np.ndarray) -> np.ndarray:
        """``[T, d_model]`` activations -> ``[T, K]`` pre-activations (what projected mode ships)."""
        out: np.ndarray = x.astype(np.float32, copy=False) @ self.w
        out += self.b
        return out

    def features(self, pre: np.ndarray, copy: bool = True) -> np.ndarray:
        """Apply the SAE nonlinearity to the latent columns; dense columns pass through.

        ``copy=False`` works in place: for a ``pre`` this process just computed (``project``'s
        output), never for a client's array.
        """
        k = self.n_latents
        if k:
            out = pre.copy() if copy else pre
            lat = out[:, :k]
            keep = lat > self.jump_threshold  # JumpReLU gate (0 for a ReLU SAE), then ReLU
            np.maximum(lat, 0.0, out=lat)
            np.multiply(lat, keep, out=lat)
            return out
        return pre


class RunningScores:
    """O(1)-memory running aggregation of per-token scores for one stream (sum, max, EMA, latent sums)."""

    def __init__(self, detectors: DetectorSet) -> None:
        self._d = detectors
        n = len(detectors.runtime)
        self.tokens: dict[str, int] = {}
        self.sum = np.zeros(n)
        self.max = np.full(n, -np.inf)
        self.ema = np.zeros(n)  # raw EMA from 0; divided by (1 - decay**n) when read (bias correction)
        self.count = np.zeros(n, dtype=np.int64)
        # per-token EMA weight from each detector's half-life
        self.alpha = np.array([1.0 - 0.5 ** (1.0 / d.spec.ema_halflife_tokens) for d in detectors.runtime])
        self.latent_sums = {hp: np.zeros(p.width) for hp, p in detectors.projections.items()}
        self.decision: dict[str, np.ndarray] = {}  # hook point -> feature row at the decision position

    def update_decision(self, hook_point: str, feats: np.ndarray) -> None:
        """Record the ``[1, K]`` feature row of the last prompt-template token at ``hook_point``."""
        self.decision[hook_point] = np.asarray(feats, dtype=np.float64).reshape(-1)

    def update(self, hook_point: str, feats: np.ndarray) -> None:
        """Fold in the feature rows ``[T, K]`` of new tokens at ``hook_point``."""
        if feats.shape[0] == 0:
            return
        self.tokens[hook_point] = self.tokens.get(hook_point, 0) + int(feats.shape[0])
        self.latent_sums[hook_point] += feats.sum(0, dtype=np.float64)
        plan = self._d.token_plans.get(hook_point)
        if plan is None:
            return
        # Every response detector of this hook point in one GEMM: [T, K] @ [K, m] (a detector's
        # unused columns are zero), then sum, max and the EMA for all of them at once.
        idx, weights, bias = plan
        s = (feats @ weights + bias).astype(np.float64)
        n = s.shape[0]
        self.sum[idx] += s.sum(0)
        self.max[idx] = np.maximum(self.max[idx], s.max(0))
        keep = 1.0 - self.alpha[idx]
        decay = keep[None, :] ** np.arange(n - 1, -1, -1, dtype=np.float64)[:, None]
        self.ema[idx] = keep**n * self.ema[idx] + self.alpha[idx] * (decay * s).sum(0)
        self.count[idx] += n

    def results(self) -> list[DetectorResult]:
        """Each detector's verdict on the tokens seen so far (detectors with no tokens are left out)."""
        out = []
        for i, det in enumerate(self._d.runtime):
            if det.spec.position == "decision":
                row = self.decision.get(det.spec.hook_point)
                if row is not None:
                    score = float(row[det.cols] @ det.weight + det.bias)
                    # The verdict rests on one row, but a critical one may halt only once the answer
                    # it judged is under way: its token count is the response tokens seen so far.
                    seen = max(1, self.tokens.get(det.spec.hook_point, 0))
                    out.append(det.result(score, score, row, seen, self._d.reports))
                continue
            n = self.tokens.get(det.spec.hook_point, 0)
            if not n:
                continue
            score = self.sum[i] / n if det.spec.aggregation == "mean" else self.max[i]
            means = self.latent_sums[det.spec.hook_point] / n
            recent = self.ema[i] / (1.0 - (1.0 - self.alpha[i]) ** self.count[i])
            out.append(det.result(float(score), float(recent), means, n, self._d.reports))
        return [r for r in out + self._d._stacks(out) if r.name not in self._d.components]


class DetectorSet:
    """The bundle's detectors, ready to score activations (full or projected) on the sliced path.

    >>> ds = DetectorSet.from_bundle(Bundle.load())
    >>> sorted({s.behaviour for s in ds.specs})
    ['deceptive_answer', 'deceptive_setup', 'harmful_compliance', 'harmful_request', 'refusal', 'sycophancy']
    """

    def __init__(
        self,
        specs: Sequence[DetectorSpec],
        probes: Mapping[str, ProbeWeights],
        bundle: Bundle,
        sae: Any,
        reports: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        """``sae``: the bundle's SAE as ``(SAEConfig, weights)`` numpy arrays, a torch ``SAE``, or None."""
        self.specs = tuple(specs)
        self.reports = dict(reports or {})
        by_name = {s.name: s for s in self.specs}
        self.projections: dict[str, HookProjection] = {}
        self.runtime: list[LinearDetector] = []
        self.stacks = [s for s in self.specs if s.kind in COMPOSITES]
        for c in self.stacks:
            for m in c.members:
                if m not in by_name or by_name[m].kind in COMPOSITES:
                    raise BundleError(f"detector {c.name}: member {m!r} is not a probe or ensemble of this bundle")
        self.reads = {s.name: _reads(s, by_name) for s in self.specs}
        self.components = frozenset(s.name for s in self.specs if s.component)
        for s in self.specs:
            if s.component and (s.critical or s.kind in COMPOSITES):
                raise BundleError(f"detector {s.name}: a component is a probe read by a stack, never critical")
        for s in self.specs:
            if s.critical and "response" not in self.reads[s.name]:
                raise BundleError(
                    f"detector {s.name}: critical, but it reads only the prompt (the decision row): a prompt "
                    "detector describes the request and may warn, never halt; set critical: false"
                )
        arrays = _sae_arrays(sae)
        for hp in bundle.hook_points:
            mine = [s for s in self.specs if s.hook_point == hp.name and s.kind not in COMPOSITES]
            if not mine:
                continue
            latents = sorted(
                {int(i) for s in mine if s.kind == "sae_probe" for i in _as_list(_probe(probes, s).latents)}
            )
            dense_names = [s.name for s in mine if s.kind == "linear_probe"]
            for name in dense_names:
                if _probe(probes, by_name[name]).weight.shape != (hp.d_model,):
                    raise BundleError(f"{WEIGHTS_FILE}: {name}.weight: expected shape [{hp.d_model}]")
            proj = HookProjection(hp.name, hp.d_model, arrays, latents, [probes[n].weight for n in dense_names])
            self.projections[hp.name] = proj
            col_of: dict[int | str, int] = {lat: j for j, lat in enumerate(latents)}
            col_of.update({_dense_key(n): proj.n_latents + j for j, n in enumerate(dense_names)})
            for spec in mine:
                cols = _columns(spec, by_name, probes, col_of)
                order = sorted(cols)
                self.runtime.append(
                    LinearDetector(
                        spec,
                        np.array(order, dtype=np.int64),
                        np.array([cols[c] for c in order], dtype=np.float32),
                        _bias(spec, by_name, probes),
                        proj.latent_ids[[c for c in order if c < proj.n_latents]],
                    )
                )

        # hook point -> (runtime indices of its response detectors, [K, m] weights, [m] biases)
        self.token_plans: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        for hp_name, proj in self.projections.items():
            idx = [
                i for i, d in enumerate(self.runtime) if d.spec.hook_point == hp_name and d.spec.position != "decision"
            ]
            if not idx:
                continue
            w = np.zeros((proj.width, len(idx)), dtype=np.float32)
            for j, i in enumerate(idx):
                w[self.runtime[i].cols, j] = self.runtime[i].weight
            b = np.array([self.runtime[i].bias for i in idx], dtype=np.float32)
            self.token_plans[hp_name] = (np.array(idx, dtype=np.int64), w, b)

    @classmethod
    def from_bundle(cls, bundle: Bundle, sae: Any = None) -> DetectorSet:
        """Load the detectors a bundle declares (an empty set when it declares none)."""
        entries = bundle.raw.get("detectors") or []
        if not isinstance(entries, list):
            raise BundleError(f"bundle.yaml: detectors: expected a list, got {type(entries).__name__}")
        specs = [DetectorSpec.from_dict(e, f"bundle.yaml: detectors[{i}]") for i, e in enumerate(entries)]
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BundleError(f"bundle.yaml: detectors: names must be unique, got {names}")
        for s in specs:
            if bundle.hook_point(s.hook_point) is None:
                raise BundleError(f"bundle.yaml: detector {s.name}: hook_point {s.hook_point!r} is not declared")
        probes: dict[str, ProbeWeights] = {}
        reports: dict[int, Any] = {}
        if specs and bundle.path is not None:
            probes = load_probe_weights(bundle.path / WEIGHTS_FILE)
            reports = load_feature_reports(bundle.path / FEATURES_FILE)
        if sae is None and any(s.kind == "sae_probe" for s in specs) and bundle.sae_path is not None:
            from monitor.sae._files import read

            sae = read(bundle.sae_path)  # numpy: serving never needs torch
        return cls(specs, probes, bundle, sae, reports)

    # -- scoring --------------------------------------------------------------------------------
    def projection(self, hook_point: str) -> HookProjection | None:
        """The projection for ``hook_point`` (None when no detector reads it)."""
        return self.projections.get(hook_point)

    def features(self, hook_point: str, x: np.ndarray, projected: bool = False) -> np.ndarray | None:
        """``[T, K]`` feature rows from full activations or from projected pre-activations."""
        proj = self.projections.get(hook_point)
        if proj is None:
            return None
        return proj.features(x, copy=True) if projected else proj.features(proj.project(x), copy=False)

    def score(
        self, hook_point: str, x: np.ndarray, projected: bool = False, decision: np.ndarray | None = None
    ) -> list[DetectorResult]:
        """Verdicts of the detectors reading ``hook_point`` on one response's activations
        (and, when given, the ``[1, width]`` row of the last prompt-template token)."""
        run = RunningScores(self)
        feats = self.features(hook_point, x, projected)
        if feats is not None:
            run.update(hook_point, feats)
        if decision is not None:
            dfeats = self.features(hook_point, decision, projected)
            if dfeats is not None:
                run.update_decision(hook_point, dfeats)
        return run.results()

    def _stacks(self, results: Sequence[DetectorResult]) -> list[DetectorResult]:
        """Stack verdicts from their members' aggregated scores (reported only when every member reported).

        The score is the fitted logistic model's logit on the members' scores; the recent score is
        the same model on each member's recent score, so a stream can halt on a late turn as with
        any detector. The top latents are those of the members with a positive coefficient (the
        evidence for the behaviour); tokens are the response members' (how much of the answer the
        verdict rests on).
        """
        by_name = {r.name: r for r in results}
        out = []
        for c in self.stacks:
            rs = {m: by_name.get(m) for m in c.members}
            if any(r is None for r in rs.values()):
                continue
            now = {m: r.score for m, r in rs.items() if r is not None}
            recent = {m: r.recent_score for m, r in rs.items() if r is not None}
            tokens = max((r.tokens for r in rs.values() if r is not None and r.reads_answer), default=0)
            feats = [f for m, r in rs.items() if r is not None and c.members[m] > 0 for f in r.top_features]
            score = stack_logit(c, now)
            out.append(
                DetectorResult(
                    name=c.name,
                    behaviour=c.behaviour,
                    kind=c.kind,
                    score=score,
                    recent_score=stack_logit(c, recent),
                    probability=c.probability(score),
                    threshold=c.threshold,
                    fired=score >= c.threshold,
                    critical=c.critical,
                    top_features=tuple(sorted(feats, key=lambda f: -f.contribution)[:3]),
                    tokens=tokens,
                    halt_min_tokens=c.halt_min_tokens,
                    reads=self.reads[c.name],
                )
            )
        return out

    def open_running(self) -> RunningScores:
        """Running state for a stream."""
        return RunningScores(self)

    def detector(self, name: str) -> LinearDetector:
        """The run-time form of detector ``name`` (its columns, weights and latents)."""
        for d in self.runtime:
            if d.spec.name == name:
                return d
        raise KeyError(f"detector {name!r}: not in this bundle; expected one of {[s.name for s in self.specs]}")

    def token_scores(self, name: str, feats: np.ndarray) -> np.ndarray:
        """Per-token scores of detector ``name`` on feature rows (used by evaluation and tests)."""
        return self.detector(name).token_scores(feats)


def stack_logit(spec: DetectorSpec, scores: Mapping[str, float]) -> float:
    """A stack's logit: bias + sum of coefficient x member score + sum of coefficient x product of two."""
    z = spec.bias + sum(coef * scores[m] for m, coef in spec.members.items())
    return float(z + sum(coef * scores[a] * scores[b] for a, b, coef in spec.interactions))


def _reads(spec: DetectorSpec, by_name: Mapping[str, DetectorSpec]) -> str:
    """What a detector's verdict rests on: ``prompt`` (decision row), ``response`` or ``prompt+response``."""
    if spec.kind in COMPOSITES:
        parts = {_reads(by_name[m], by_name) for m in spec.members if m in by_name}
        has_p, has_r = any("prompt" in p for p in parts), any("response" in p for p in parts)
        return "prompt+response" if has_p and has_r else ("prompt" if has_p else "response")
    return "prompt" if spec.position == "decision" else "response"


def _sae_arrays(sae: Any) -> tuple[SAEConfig, Mapping[str, np.ndarray]] | None:
    """The SAE as numpy arrays: given so, or read off a torch ``SAE`` (what fitting passes)."""
    if sae is None or isinstance(sae, tuple):
        return sae
    return sae.cfg, {k: v.float().numpy() for k, v in sae.state().items()}


def _as_list(a: np.ndarray | None) -> list[int]:
    return [] if a is None else [int(i) for i in a]


def _dense_key(name: str) -> str:
    return f"dense:{name}"


def _columns(
    spec: DetectorSpec,
    by_name: Mapping[str, DetectorSpec],
    probes: Mapping[str, ProbeWeights],
    col_of: Mapping[int | str, int],
) -> dict[int, float]:
    """Projection column -> weight for a detector, expanding an ensemble into its members' columns."""
    if spec.kind == "ensemble":
        acc: dict[int, float] = {}
        for member, coef in spec.members.items():
            if member not in by_name or by_name[member].kind == "ensemble":
                raise BundleError(f"detector {spec.name}: member {member!r} is not a probe of this bundle")
            for c, w in _columns(by_name[member], by_name, probes, col_of).items():
                acc[c] = acc.get(c, 0.0) + coef * w
        return acc
    pw = _probe(probes, spec)
    if spec.kind == "linear_probe":
        return {col_of[_dense_key(spec.name)]: 1.0}
    if pw.latents is None:
        raise BundleError(f"{WEIGHTS_FILE}: {spec.name}: a sae_probe needs {spec.name}.latents")
    return {col_of[int(lat)]: float(w) for lat, w in zip(pw.latents, pw.weight, strict=True)}


def _bias(spec: DetectorSpec, by_name: Mapping[str, DetectorSpec], probes: Mapping[str, ProbeWeights]) -> float:
    if spec.kind == "ensemble":
        return spec.bias + sum(c * _bias(by_name[m], by_name, probes) for m, c in spec.members.items())
    return _probe(probes, spec).bias


def _probe(probes: Mapping[str, ProbeWeights], spec: DetectorSpec) -> ProbeWeights:
    if spec.name not in probes:
        raise BundleError(f"{WEIGHTS_FILE}: expected weights for detector {spec.name!r}, found none")
    return probes[spec.name]
