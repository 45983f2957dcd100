"""The detectors' manifest schema and weight files: what ``bundle.yaml`` and ``detectors.safetensors`` hold.

``DetectorSpec`` is one ``detectors:`` entry of the manifest; ``ProbeWeights`` one fitted probe as
stored. Fitting writes these, ``DetectorSet`` (``_scoring``) turns them into run-time maths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitor.detectors._bundle import BundleError
from monitor.errors import echo, read_json_object

KINDS = ("sae_probe", "linear_probe", "ensemble", "stack")
COMPOSITES = ("stack",)  # kinds computed from other detectors' verdicts, not from projection columns
POSITIONS = ("response", "decision")
AGGREGATIONS = ("mean", "max")
WEIGHTS_FILE = "detectors.safetensors"
FEATURES_FILE = "detectors.features.json"


@dataclass(frozen=True)
class DetectorSpec:
    """One ``detectors:`` entry of ``bundle.yaml`` (weights live in ``detectors.safetensors``).

    threshold: score at or above which the detector fires (set at ``target_fpr`` on held-out negatives).
    calibration: ``(slope, intercept)`` of the Platt map score -> probability.
    members: for an ensemble, ``{member name: coefficient}`` over the members' per-token scores; its
        ``bias`` is the stack's intercept. For a stack, the coefficient of each member's
        *aggregated* score in a fitted logistic model (its score is that model's logit), so two
        detectors are combined by a fit on data, not by multiplying their probabilities.
    interactions: for a stack, ``[member, member, coefficient]`` triples: the coefficient of the
        product of two members' scores (how "harmful request" and "refused" combine is fitted).
    component: a part of a stack (e.g. the prompt or the answer half of one probe fitted on both),
        scored only as the stack's input and never reported on its own: its score alone is no
        calibrated verdict on anything.
    position: ``response`` (pool the response tokens) or ``decision`` (read the one row at the last
        prompt-template token, which requests carry in their ``decision`` field).
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
    position: str = "response"
    interactions: tuple[tuple[str, str, float], ...] = ()
    component: bool = False

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
                position=str(d.get("position", "response")),
                interactions=tuple((str(a), str(b), float(c)) for a, b, c in (d.get("interactions") or [])),
                component=bool(d.get("component", False)),
            )
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{where}: missing or malformed key: {echo(str(exc), 300)}") from None
        if spec.kind not in KINDS:
            raise BundleError(f"{where}.kind: expected one of {list(KINDS)}, got {spec.kind!r}")
        if spec.aggregation not in AGGREGATIONS:
            raise BundleError(f"{where}.aggregation: expected one of {list(AGGREGATIONS)}, got {spec.aggregation!r}")
        if spec.position not in POSITIONS:
            raise BundleError(f"{where}.position: expected one of {list(POSITIONS)}, got {spec.position!r}")
        if spec.interactions and spec.kind != "stack":
            raise BundleError(f"{where}.interactions: only a stack has interactions, this is a {spec.kind}")
        if any(a not in spec.members or b not in spec.members for a, b, _ in spec.interactions):
            raise BundleError(f"{where}.interactions: each pair must name two of the members {sorted(spec.members)}")
        if spec.kind in ("ensemble", "stack") and not spec.members:
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
        if self.position != "response":
            d["position"] = self.position
        if self.kind in ("ensemble", "stack"):
            d["members"] = dict(self.members)
            d["bias"] = self.bias
        if self.interactions:
            d["interactions"] = [list(t) for t in self.interactions]
        if self.component:
            d["component"] = True
        d["metrics"] = dict(self.metrics)
        d["provenance"] = dict(self.provenance)
        return d

    def probability(self, score: float) -> float:
        """Calibrated probability of the behaviour for an aggregated score (Platt, fitted on out-of-fold scores)."""
        z = self.calibration[0] * score + self.calibration[1]
        return 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0


@dataclass(frozen=True)
class ProbeWeights:
    """A fitted probe on raw inputs: SAE latents (``latents`` set) or the raw residual (``latents`` None)."""

    weight: np.ndarray
    bias: float
    latents: np.ndarray | None = None


def load_probe_weights(path: Path) -> dict[str, ProbeWeights]:
    """Read ``detectors.safetensors`` (keys ``<name>.weight``, ``<name>.bias``, ``<name>.latents``).

    A truncated or garbage file, or one whose tensors are not a probe's, raises ``BundleError``
    naming the file and the key (never a safetensors or numpy traceback at start-up).
    """
    if not path.is_file():
        raise BundleError(f"bundle: expected detector weights at {path}, found nothing")
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        raw = load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as exc:
        raise BundleError(f"{path}: expected a safetensors file of probe weights, unreadable: {exc}") from None
    names = {k.rsplit(".", 1)[0] for k in raw}
    out = {}
    for n in sorted(names):
        weight, bias, lat = raw.get(f"{n}.weight"), raw.get(f"{n}.bias"), raw.get(f"{n}.latents")
        if weight is None or bias is None or weight.ndim != 1 or bias.size != 1:
            got = {k: list(v.shape) for k, v in raw.items() if k.rsplit(".", 1)[0] == n}
            raise BundleError(f"{path}: {n}: expected a 1-d {n}.weight and a one-element {n}.bias, got {got}")
        if not np.issubdtype(weight.dtype, np.floating) or (lat is not None and lat.dtype.kind not in "iu"):
            raise BundleError(f"{path}: {n}: expected float weights and integer latents")
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise BundleError(f"{path}: {n}: expected finite weight and bias values, got NaN or infinity")
        out[n] = ProbeWeights(
            weight=weight.astype(np.float32),
            bias=float(bias.reshape(-1)[0]),
            latents=None if lat is None else lat.astype(np.int64),
        )
        if out[n].latents is not None and out[n].latents.shape != out[n].weight.shape:  # type: ignore[union-attr]
            raise BundleError(f"{path}: {n}: latents and weight must have the same length")
    return out


def load_feature_reports(path: Path) -> dict[int, dict[str, Any]]:
    """Read ``detectors.features.json`` ({latent id: {"label", "example", ...}}); a missing file is
    no reports. Checked whole at start-up: a bad entry used to surface on every scored request."""
    if not path.is_file():
        return {}
    doc = read_json_object(path, BundleError, "a JSON object of feature reports")
    out: dict[int, dict[str, Any]] = {}
    for key, report in doc.items():
        if not (key.isascii() and key.isdigit()) or not isinstance(report, dict):
            raise BundleError(
                f"{path}: {echo(key)}: expected a latent id mapped to an object, got {echo(key)}: {echo(report)}"
            )
        out[int(key)] = report
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
