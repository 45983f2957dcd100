"""Rendering ``docs/model-card.md`` from measured figures (never from hand-typed numbers)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from monitor.detectors._bundle import Bundle
from monitor.detectors._evaluate import GOALS, fit_sources
from monitor.detectors._metrics import SplitMetrics
from monitor.detectors._scoring import DetectorSet

KIND_ORDER = ("sae_probe", "linear_probe", "ensemble", "stack", "naive_baseline", "phrase_match")
PROBE_KINDS = ("sae_probe", "linear_probe", "ensemble")

INTRO = """\
# Model card: detectors of the default bundle

Bundle `{name}` {version} for `{model}`, hook point `{hook}`. Written by `monitor evaluate`
(`make evaluate`) from the bundle as shipped: every figure below is a score served by the same
code as the sidecar's `Score` RPC (`monitor.detectors.DetectorSet`), on rows the detectors were not
fitted on. Labeled data: `data/detectors/` (see its SOURCE.md); rebuild the detectors with
`monitor train-detectors` (`make detectors`).

How to read it:
- **validation**: a fixed 20 % of the training source's prompt groups (by hash), held out from fitting,
  from hyper-parameter choice and from calibration.
- **cross:&lt;source&gt;**: a different source of the same behaviour, never used for fitting: the
  headline figure, since in-distribution validation says little about deployment.
- **diagnostic:&lt;source&gt;**: scored and shown, but outside what the detector claims to detect
  (see the behaviour's notes); not held to the goals.
- **R@1%FPR**: recall at the threshold that gives 1 % false positives *on that split's own
  negatives*. **FPR@thr / recall@thr**: the rates with the bundle's shipped threshold, i.e. what an
  operator will see. A probe's threshold is calibrated at {fpr:.0%} FPR on the *out-of-fold
  scores of its fitting part's negatives*; on other sources its FPR is what the FPR@thr column
  measures (often well above {fpr:.0%}), and on ordinary traffic what the "Ordinary streams"
  section measures. The one critical detector's threshold is set on ordinary traffic instead.
- **ECE**: expected calibration error of the probability the sidecar reports (10 equal-width bins)
  on that split: 0 means each probability is the frequency it claims. A dash: no probability.
- **reads**: `prompt` (only the last prompt-template token: describes the request; may warn, never
  halt), `response` (the answer's tokens) or `prompt+response`. Only a critical detector that reads
  the response can advise HALT; the loader refuses a bundle that marks a prompt detector critical.
- Goals (issue 4): AUROC ≥ {val:.2f} on validation and ≥ {cross:.2f} across sources; the SAE probe
  within {gap:.2f} of the dense probe; the ensemble at least as good as both.

Provenance: the SAE and every detector were fitted on activations of {weights}.
"""


def _fmt(x: float) -> str:
    return "–" if x != x else f"{x:.3f}"  # NaN -> dash


def render_model_card(
    bundle: Bundle, results: Mapping[str, Mapping[str, Mapping[str, SplitMetrics]]], notes: Mapping[str, str]
) -> str:
    """The model card as Markdown."""
    ds = DetectorSet.from_bundle(bundle)
    spec_of = {s.name: s for s in ds.specs}
    fpr = ds.specs[0].target_fpr if ds.specs else 0.01
    weights = next(
        (str(s.provenance["weights"]) for s in ds.specs if "weights" in s.provenance),
        "the weights the detectors were fitted on are not recorded in this bundle",
    )
    lines = [
        INTRO.format(
            weights=weights,
            name=bundle.name,
            version=bundle.version,
            model=bundle.model,
            hook=bundle.hook_points[0].name,
            fpr=fpr,
            val=GOALS["validation_auroc"],
            cross=GOALS["cross_auroc"],
            gap=GOALS["sae_gap"],
        )
    ]
    lines.append("## Summary against the goals\n")
    lines.append("| behaviour | split | SAE probe | dense probe | ensemble | goal met? |")
    lines.append("|---|---|---|---|---|---|")
    for beh, per_det in results.items():
        if not any(f"{beh}.{k}" in per_det for k in PROBE_KINDS):
            continue
        splits = sorted({sp for m in per_det.values() for sp in m if sp != "sample"})
        for sp in splits:
            a = {k: per_det.get(f"{beh}.{k}", {}).get(sp) for k in ("sae_probe", "linear_probe", "ensemble")}
            au = {k: (m.auroc if m else float("nan")) for k, m in a.items()}
            row = f"| {beh} | {sp} | {_fmt(au['sae_probe'])} | {_fmt(au['linear_probe'])} | {_fmt(au['ensemble'])} "
            lines.append(row + f"| {_goal_checks(sp, au)} |")
    lines.append("\nAUROC per cell. Details per behaviour follow.\n")
    for beh, per_det in results.items():
        lines.append(f"## {beh}\n")
        any_spec = next((spec_of[n] for n in per_det if n in spec_of), None)
        if any_spec is not None:
            lines.append(_fitted_line(any_spec.provenance))
        if beh in notes:
            lines.append(notes[beh].strip() + "\n")
        lines.append(
            "| detector | kind | reads | aggregation | split | n (pos) | AUROC | R@1%FPR | FPR@thr | recall@thr | ECE |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        names = sorted(per_det, key=_kind_rank)
        for name in names:
            spec = spec_of.get(name)
            kind = spec.kind if spec else name.split(".", 1)[-1]
            agg = spec.aggregation if spec else "–"
            reads = ds.reads.get(name, "–")
            for sp, m in sorted(per_det[name].items(), key=lambda kv: (kv[0] == "sample", kv[0])):
                lines.append(
                    f"| `{name}` | {kind} | {reads} | {agg} | {sp} | {m.n} ({m.positives}) | {_fmt(m.auroc)} | "
                    f"{_fmt(m.recall_at_1pct_fpr)} | {_fmt(m.fpr_at_threshold)} | {_fmt(m.recall_at_threshold)} | "
                    f"{_fmt(m.ece)} |"
                )
        stack = spec_of.get(beh)
        if stack is not None and stack.kind == "stack":
            terms = [f"{c:+.4g} × `{m}`" for m, c in stack.members.items()]
            terms += [f"{c:+.4g} × `{a}` × `{b}`" for a, b, c in stack.interactions]
            parts = [f"`{n}`" for n in stack.members if n in spec_of and spec_of[n].component]
            lines.append(
                f"\nThe stack's logit: {stack.bias:+.4g} {' '.join(terms)}; fires (and, being critical, "
                f"halts) at logit ≥ {stack.threshold:.4g} (P = {stack.probability(stack.threshold):.3f}). "
                f"Components (read only by the stack): {', '.join(parts) or 'none'}.\n"
            )
        sae = spec_of.get(f"{beh}.sae_probe")
        if sae is not None:
            ch = sae.provenance.get("choices", {})
            lines.append(
                f"\nSAE probe: {ch.get('k')} latents selected by {ch.get('selection')}, C={ch.get('c')}, "
                f"{sae.aggregation} aggregation "
                f"(chosen by grouped {sae.provenance.get('folds')}-fold CV on the fitting part, CV AUROC "
                f"{ch.get('cv_auroc')}). Top latents by |weight|, with their labels from the SAE's feature reports:\n"
            )
            lines.extend(_latent_lines(ds, sae.name))
        lines.append("")
    lines.extend(_stream_lines(bundle, ds))
    lines.append(
        "`sample` is the fixed subset (first groups by hash of each held-out split) that "
        "`tests/integration/test_detectors_grpc.py` replays through a real gRPC server.\n"
    )
    return "\n".join(lines)


def _fitted_line(prov: Mapping[str, object]) -> str:
    """What a behaviour was fitted on, with rows borrowed from other behaviours counted apart."""
    others = ", ".join(f"`{c}`" for c in prov.get("cross_sources", []))  # type: ignore[attr-defined]
    if "rule" in prov:
        return (
            f"Score: {prov.get('rule')}. Fitted on {', '.join(f'`{x}`' for x in fit_sources(prov))} "
            f"({prov.get('fit_rows')} rows, {prov.get('fit_positives')} positive; out-of-fold AUROC "
            f"{prov.get('choices', {}).get('cv_auroc')}). Threshold: {prov.get('threshold')}. Data "  # type: ignore[attr-defined]
            f"`{prov.get('data')}`; held-out sources: {others}.\n"
        )
    negs = [str(n) for n in prov.get("negatives_from", [])]  # type: ignore[attr-defined]
    borrowed = sum(int(n.rsplit("(", 1)[1].split()[0]) for n in negs if "(" in n)
    rows = int(prov.get("fit_rows", 0))  # type: ignore[call-overload]
    own = f"{' + '.join(f'`{x}`' for x in fit_sources(prov))} ({rows - borrowed} rows)"
    extra = f" plus negatives from {', '.join(negs)}: {rows} rows in all" if negs else ""
    return (
        f"Fitted on {own}{extra}, {prov.get('fit_positives')} positive; data "
        f"`{prov.get('data')}`; other sources: {others}.\n"
    )


def _goal_checks(split: str, au: Mapping[str, float]) -> str:
    """The issue's goals for one (behaviour, split) row, with the measured gap when one is missed."""
    if split.startswith("diagnostic:"):
        return "diagnostic source, outside the detector's scope: no goal"
    goal = GOALS["validation_auroc"] if split == "validation" else GOALS["cross_auroc"]
    ens, sae, dense = au["ensemble"], au["sae_probe"], au["linear_probe"]
    gap = dense - sae
    best = max(sae, dense)
    return "; ".join(
        [
            f"ensemble ≥ {goal:.2f}: " + ("yes" if ens >= goal else f"**no** ({ens - goal:+.3f})"),
            f"SAE within {GOALS['sae_gap']:.2f} of dense: "
            + ("yes" if gap <= GOALS["sae_gap"] else f"**no** (SAE {-gap:+.3f})"),
            "ensemble ≥ both: " + ("yes" if ens >= best else f"**no** ({ens - best:+.4f})"),
        ]
    )


def _kind_rank(name: str) -> int:
    kind = name.split(".", 1)[-1]
    return KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)


def _latent_lines(ds: DetectorSet, name: str, top: int = 8) -> list[str]:
    out = []
    for lat, weight in ds.detector(name).latent_weights()[:top]:
        rep = ds.reports.get(lat, {})
        ex = str(rep.get("example", "")).replace("|", "\\|").replace("\n", " ")[:90]
        out.append(f"- latent {lat} (weight {weight:+.3f}): “{rep.get('label', '')}” e.g. `{ex}`")
    return out


def write_model_card(path: Path, text: str) -> None:
    """Write the card, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _stream_lines(bundle: Bundle, ds: DetectorSet) -> list[str]:
    """The "Ordinary streams" section from the manifest's ``ordinary_streams`` record."""
    rec = bundle.raw.get("ordinary_streams")
    if not rec or "kinds" not in rec:
        return ["## Ordinary streams\n", "Not measured for this bundle (`monitor train-detectors`).\n"]
    kinds = rec["kinds"]
    out = [
        "## Ordinary streams\n",
        f"{rec['source']}, replayed chunk by chunk ({rec['chunk_tokens']} tokens per chunk, decision row "
        f"with the first) through the stream scorer behind `ScoreStream`. Measured by `{rec['command']}`. A "
        "stream *fires* a detector when any verdict of it fires; it is *halted* when the pipeline advises "
        "HALT. None of these prompts was used for a fit or a threshold (those used the other half).\n",
        f"- **HALT rate on {rec['ordinary_streams']} held-out ordinary requests (everyday + borderline-safe): "
        f"{rec['ordinary_halted']:.2%}** (goal ≤ 0.5 %)",
    ]
    out += [
        f"- {k}: {v['streams']} streams, halted {v['halted']:.2%}, any critical detector fired "
        f"{v['any_critical_fired']:.2%}"
        for k, v in kinds.items()
    ]
    names = list(kinds)
    out += [
        "",
        "| detector | critical | reads | threshold | " + " | ".join(f"fired on {k}" for k in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]
    for s in ds.specs:
        if not any(s.name in kinds[k]["detectors"] for k in names):
            continue
        cells = " | ".join(f"{kinds[k]['detectors'].get(s.name, float('nan')):.2%}" for k in names)
        out.append(
            f"| `{s.name}` | {'yes' if s.critical else 'no'} | {ds.reads[s.name]} | {s.threshold:.4g} | {cells} |"
        )
    out.append("")
    return out


def recorded_results(bundle: Bundle) -> dict[str, dict[str, dict[str, SplitMetrics]]]:
    """The figures ``bundle.yaml`` records (detectors and baselines), shaped like ``evaluate_bundle``'s."""
    out: dict[str, dict[str, dict[str, SplitMetrics]]] = {}
    entries = list(bundle.raw.get("detectors") or []) + [
        {"name": k, **v} for k, v in (bundle.raw.get("baselines") or {}).items()
    ]
    for e in entries:
        metrics = e.get("metrics") or {}
        if metrics:
            beh = str(e.get("behaviour", str(e["name"]).split(".", 1)[0]))
            out.setdefault(beh, {})[str(e["name"])] = {sp: SplitMetrics(**m) for sp, m in metrics.items()}
    return out
