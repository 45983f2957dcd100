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

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.detectors._bundle import Bundle, BundleError

KINDS = ("sae_probe", "linear_probe", "ensemble")
AGGREGATIONS = ("mean", "max")
WEIGHTS_FILE = "detectors.safetensors"
FEATURES_FILE = "detectors.features.json"


@dataclass(frozen=True)
class DetectorSpec:
    """One ``detectors:`` entry of ``bundle.yaml`` (weights live in ``detectors.safetensors``).

    threshold: score at or above which the detector fires (set at ``target_fpr`` on held-out negatives).
    calibration: ``(slope, intercept)`` of the Platt map score -> probability.
    members: for an ensemble, ``{member name: coefficient}``; its ``bias`` is the stack's intercept.
    """

    name: str
    behaviour: str
    kind: str
    hook_point: str
    aggregation: str
    threshold: float
    target_fpr: float
    calibration: tuple[float, float]
    critical: bool = False
    members: Mapping[str, float] = field(default_factory=dict)
    bias: float = 0.0
    ema_halflife_tokens: float = 16.0
    halt_min_tokens: int = 8
    metrics: Mapping[str, Any] = field(default_factory=dict)
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str) -> DetectorSpec:
        """Parse one manifest entry; errors name the entry and the field."""
        try:
            spec = cls(
                name=str(d["name"]),
                behaviour=str(d["behaviour"]),
                kind=str(d["kind"]),
                hook_point=str(d["hook_point"]),
                aggregation=str(d.get("aggregation", "mean")),
                threshold=float(d["threshold"]),
                target_fpr=float(d.get("target_fpr", 0.01)),
                calibration=(float(d["calibration"]["slope"]), float(d["calibration"]["intercept"])),
                critical=bool(d.get("critical", False)),
                members={str(k): float(v) for k, v in (d.get("members") or {}).items()},
                bias=float(d.get("bias", 0.0)),
                ema_halflife_tokens=float(d.get("ema_halflife_tokens", 16.0)),
                halt_min_tokens=int(d.get("halt_min_tokens", 8)),
                metrics=dict(d.get("metrics") or {}),
                provenance=dict(d.get("provenance") or {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: missing or malformed key: {exc}") from exc
        if spec.kind not in KINDS:
            raise BundleError(f"{where}.kind: expected one of {list(KINDS)}, got {spec.kind!r}")
        if spec.aggregation not in AGGREGATIONS:
            raise BundleError(f"{where}.aggregation: expected one of {list(AGGREGATIONS)}, got {spec.aggregation!r}")
        if spec.kind == "ensemble" and not spec.members:
            raise BundleError(f"{where}.members: expected at least one member for an ensemble, got none")
        if spec.ema_halflife_tokens <= 0:
            raise BundleError(f"{where}.ema_halflife_tokens: expected > 0, got {spec.ema_halflife_tokens}")
        return spec

    def to_dict(self) -> dict[str, Any]:
        """The manifest entry (inverse of ``from_dict``)."""
        d: dict[str, Any] = {
            "name": self.name,
            "behaviour": self.behaviour,
            "kind": self.kind,
            "hook_point": self.hook_point,
            "aggregation": self.aggregation,
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "calibration": {"slope": self.calibration[0], "intercept": self.calibration[1]},
            "critical": self.critical,
            "ema_halflife_tokens": self.ema_halflife_tokens,
            "halt_min_tokens": self.halt_min_tokens,
        }
        if self.kind == "ensemble":
            d["members"] = dict(self.members)
            d["bias"] = self.bias
        d["metrics"] = dict(self.metrics)
        d["provenance"] = dict(self.provenance)
        return d

    def probability(self, score: float) -> float:
        """Calibrated probability of the behaviour for an aggregated score."""
        z = self.calibration[0] * score + self.calibration[1]
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class ProbeWeights:
    """A fitted probe on raw inputs: SAE latents (``latents`` set) or the raw residual (``latents`` None)."""

    weight: np.ndarray
    bias: float
    latents: np.ndarray | None = None


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


@dataclass
class _Linear:
    """A detector at run time: per-token score = features[:, cols] @ weight + bias."""

    spec: DetectorSpec
    cols: np.ndarray
    weight: np.ndarray
    bias: float
    n_latent_cols: int  # how many of ``cols`` are SAE latents (contributions are reported for them)


class HookProjection:
    """The shared ``[d_model, K]`` projection of one hook point: SAE latent columns, then dense columns."""

    def __init__(self, hook_point: str, d_model: int, sae: Any, latent_ids: Sequence[int], dense: Sequence[np.ndarray]):
        self.hook_point = hook_point
        self.latent_ids = np.asarray(latent_ids, dtype=np.int64)
        k = len(self.latent_ids)
        w = np.zeros((d_model, k + len(dense)), dtype=np.float32)
        b = np.zeros(k + len(dense), dtype=np.float32)
        self.jump_threshold = np.zeros(k, dtype=np.float32)
        if k:
            if sae is None:
                raise BundleError(f"hook point {hook_point}: SAE probes need the bundle's sae, none loaded")
            from monitor.sae import SlicedEncoder

            enc = SlicedEncoder(sae, self.latent_ids.tolist())
            if enc.full_encode_required:
                raise BundleError(f"hook point {hook_point}: SAE probes over a TopK SAE cannot be sliced")
            w[:, :k] = enc.W.detach().float().numpy()
            b[:k] = enc.b.detach().float().numpy()
            self.jump_threshold = enc.threshold.detach().float().numpy().astype(np.float32)
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

    def features(self, pre: np.ndarray) -> np.ndarray:
        """Apply the SAE nonlinearity to the latent columns; dense columns pass through."""
        k = self.n_latents
        if k:
            lat = pre[:, :k]
            pre = pre.copy()
            pre[:, :k] = np.where(lat > self.jump_threshold, np.maximum(lat, 0.0), 0.0)
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

    def update(self, hook_point: str, feats: np.ndarray) -> None:
        """Fold in the feature rows ``[T, K]`` of new tokens at ``hook_point``."""
        if feats.shape[0] == 0:
            return
        self.tokens[hook_point] = self.tokens.get(hook_point, 0) + int(feats.shape[0])
        self.latent_sums[hook_point] += feats.sum(0, dtype=np.float64)
        for i, det in enumerate(self._d.runtime):
            if det.spec.hook_point != hook_point:
                continue
            s = feats[:, det.cols] @ det.weight + det.bias
            self.sum[i] += float(s.sum(dtype=np.float64))
            self.max[i] = max(self.max[i], float(s.max()))
            alpha = float(self.alpha[i])
            decay = (1.0 - alpha) ** np.arange(len(s) - 1, -1, -1, dtype=np.float64)
            self.ema[i] = (1.0 - alpha) ** len(s) * self.ema[i] + alpha * float(decay @ s)
            self.count[i] += len(s)

    def results(self) -> list[DetectorResult]:
        """Each detector's verdict on the tokens seen so far (detectors with no tokens are left out)."""
        out = []
        for i, det in enumerate(self._d.runtime):
            n = self.tokens.get(det.spec.hook_point, 0)
            if not n:
                continue
            score = self.sum[i] / n if det.spec.aggregation == "mean" else self.max[i]
            means = self.latent_sums[det.spec.hook_point] / n
            recent = self.ema[i] / (1.0 - (1.0 - self.alpha[i]) ** self.count[i])
            out.append(self._d._result(det, float(score), float(recent), means, n))
        return out


class DetectorSet:
    """The bundle's detectors, ready to score activations (full or projected) on the sliced path.

    >>> ds = DetectorSet.from_bundle(Bundle.load())
    >>> sorted({s.behaviour for s in ds.specs})
    ['deception', 'refusal', 'sycophancy']
    """

    def __init__(
        self,
        specs: Sequence[DetectorSpec],
        probes: Mapping[str, ProbeWeights],
        bundle: Bundle,
        sae: Any,
        reports: Mapping[int, Mapping[str, Any]] | None = None,
    ) -> None:
        self.specs = tuple(specs)
        self.reports = dict(reports or {})
        by_name = {s.name: s for s in self.specs}
        self.projections: dict[str, HookProjection] = {}
        self.runtime: list[_Linear] = []
        for hp in bundle.hook_points:
            mine = [s for s in self.specs if s.hook_point == hp.name]
            if not mine:
                continue
            latents = sorted(
                {int(i) for s in mine if s.kind == "sae_probe" for i in _as_list(_probe(probes, s).latents)}
            )
            dense_names = [s.name for s in mine if s.kind == "linear_probe"]
            for name in dense_names:
                if _probe(probes, by_name[name]).weight.shape != (hp.d_model,):
                    raise BundleError(f"{WEIGHTS_FILE}: {name}.weight: expected shape [{hp.d_model}]")
            proj = HookProjection(hp.name, hp.d_model, sae, latents, [probes[n].weight for n in dense_names])
            self.projections[hp.name] = proj
            col_of: dict[int | str, int] = {lat: j for j, lat in enumerate(latents)}
            col_of.update({_dense_key(n): proj.n_latents + j for j, n in enumerate(dense_names)})
            for spec in mine:
                cols = _columns(spec, by_name, probes, col_of)
                order = sorted(cols)
                self.runtime.append(
                    _Linear(
                        spec,
                        np.array(order, dtype=np.int64),
                        np.array([cols[c] for c in order], dtype=np.float32),
                        _bias(spec, by_name, probes),
                        sum(1 for c in order if c < proj.n_latents),
                    )
                )

    @classmethod
    def from_bundle(cls, bundle: Bundle, sae: Any = None) -> DetectorSet:
        """Load the detectors a bundle declares (an empty set when it declares none)."""
        entries = bundle.raw.get("detectors") or []
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
            feats = bundle.path / FEATURES_FILE
            if feats.is_file():
                reports = {int(k): v for k, v in json.loads(feats.read_text()).items()}
        if sae is None and any(s.kind == "sae_probe" for s in specs):
            sae = bundle.load_sae()
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
        return proj.features(x if projected else proj.project(x))

    def score(self, hook_point: str, x: np.ndarray, projected: bool = False) -> list[DetectorResult]:
        """Verdicts of the detectors reading ``hook_point`` on one response's activations."""
        run = RunningScores(self)
        feats = self.features(hook_point, x, projected)
        if feats is not None:
            run.update(hook_point, feats)
        return run.results()

    def open_running(self) -> RunningScores:
        """Running state for a stream."""
        return RunningScores(self)

    def token_scores(self, name: str, feats: np.ndarray) -> np.ndarray:
        """Per-token scores of detector ``name`` on feature rows (used by evaluation and tests)."""
        det = next(d for d in self.runtime if d.spec.name == name)
        out: np.ndarray = feats[:, det.cols] @ det.weight + det.bias
        return out

    def _result(self, det: _Linear, score: float, recent: float, col_means: np.ndarray, tokens: int) -> DetectorResult:
        spec = det.spec
        contribs = []
        proj = self.projections[spec.hook_point]
        for c, w in zip(det.cols[: det.n_latent_cols], det.weight[: det.n_latent_cols], strict=True):
            value = float(col_means[c]) * float(w)
            if value > 0:
                latent = int(proj.latent_ids[c])
                rep = self.reports.get(latent, {})
                contribs.append(
                    Contribution(
                        latent, float(col_means[c]), value, str(rep.get("label", "")), str(rep.get("example", ""))
                    )
                )
        contribs.sort(key=lambda c: -c.contribution)
        fired = score >= spec.threshold
        return DetectorResult(
            name=spec.name,
            behaviour=spec.behaviour,
            kind=spec.kind,
            score=score,
            recent_score=recent,
            probability=spec.probability(score),
            threshold=spec.threshold,
            fired=fired,
            critical=spec.critical,
            top_features=tuple(contribs[:3]),
            tokens=tokens,
            halt_min_tokens=spec.halt_min_tokens,
        )


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


def load_probe_weights(path: Path) -> dict[str, ProbeWeights]:
    """Read ``detectors.safetensors`` (keys ``<name>.weight``, ``<name>.bias``, ``<name>.latents``)."""
    if not path.is_file():
        raise BundleError(f"bundle: expected detector weights at {path}, found nothing")
    from safetensors.numpy import load_file

    raw = load_file(str(path))
    names = {k.rsplit(".", 1)[0] for k in raw}
    out = {}
    for n in names:
        lat = raw.get(f"{n}.latents")
        out[n] = ProbeWeights(
            weight=raw[f"{n}.weight"].astype(np.float32),
            bias=float(raw[f"{n}.bias"].reshape(-1)[0]),
            latents=None if lat is None else lat.astype(np.int64),
        )
        if out[n].latents is not None and out[n].latents.shape != out[n].weight.shape:  # type: ignore[union-attr]
            raise BundleError(f"{path}: {n}: latents and weight must have the same length")
    return out


def save_probe_weights(path: Path, probes: Mapping[str, ProbeWeights]) -> None:
    """Write ``detectors.safetensors``."""
    from safetensors.numpy import save_file

    tensors: dict[str, np.ndarray] = {}
    for n, p in probes.items():
        tensors[f"{n}.weight"] = np.ascontiguousarray(p.weight, dtype=np.float32)
        tensors[f"{n}.bias"] = np.array([p.bias], dtype=np.float32)
        if p.latents is not None:
            tensors[f"{n}.latents"] = np.ascontiguousarray(p.latents, dtype=np.int64)
    save_file(tensors, str(path))
