"""The default bundle's detectors, served by a real sidecar over gRPC, on real model activations.

The fixed sample (``sample_groups``: the first groups by hash of every held-out split) is run
teacher-forced through the default model, each response is scored with ``Score`` on a server on
127.0.0.1, and the AUROC of every detector on the sample must reproduce the figure the bundle
records (``metrics.sample.auroc``) within ``AUROC_TOLERANCE``. Scores must equal the in-process
``DetectorSet`` to ``SCORE_TOLERANCE`` (activations are recomputed in different batches, so
padding changes them by ~1e-5).
"""

from __future__ import annotations

import numpy as np
import pytest

from monitor.client import Generation, MonitorClient
from monitor.detectors import Bundle, DetectorSet
from monitor.detectors._activations import LabeledRow, load_rows, response_activations, response_tokens
from monitor.detectors._evaluate import data_files, sample_groups, scored_sources
from monitor.detectors._manifest import KINDS
from monitor.detectors._metrics import auroc
from monitor.models import load_default_model
from tests.conftest import MODEL, ServerThread, sample

AUROC_TOLERANCE = 0.02
SCORE_TOLERANCE = 2e-3

Sample = dict[str, tuple[list[LabeledRow], list[np.ndarray], list[np.ndarray]]]  # rows, response, decision row


@pytest.fixture(scope="module")
def bundle() -> Bundle:
    return Bundle.load()


@pytest.fixture(scope="module")
def fixed_sample(bundle: Bundle) -> Sample:
    ds = DetectorSet.from_bundle(bundle)
    model, tok = load_default_model()
    out: Sample = {}
    for beh in sorted({s.behaviour for s in ds.specs}):
        spec = next(s for s in ds.specs if s.behaviour == beh and not s.component)
        rows = [r for stem in data_files(beh) for r in load_rows(stem)]
        keep = sample_groups(rows, *scored_sources(spec))
        rows = [r for r in rows if r.group in keep]
        acts = response_activations(model, tok, rows, spec.hook_point, progress=False)
        out[beh] = (rows, [response_tokens(a) for a in acts], [a[:1].numpy() for a in acts])
    return out


def test_bundle_declares_every_kind_for_every_behaviour(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    kinds = {(s.behaviour, s.kind) for s in ds.specs if not s.component}
    probes = ("deceptive_setup", "deceptive_answer", "sycophancy", "refusal", "harmful_request")
    assert kinds == {(b, k) for b in probes for k in ("sae_probe", "linear_probe", "ensemble")} | {
        ("harmful_compliance", "stack")
    }
    assert {s.name for s in ds.specs if s.position == "decision" and not s.component} == {
        f"{b}.{k}" for b in ("harmful_request", "deceptive_setup") for k in KINDS[:3]
    }
    # the direct probe read by the stack: its prompt half and its answer half, never reported alone
    assert {(s.name, s.position) for s in ds.specs if s.component} == {
        ("harmful_compliance.prompt_part", "decision"),
        ("harmful_compliance.answer_part", "response"),
    }
    # the one critical detector reads the answer; no prompt-only detector is critical
    assert {s.name for s in ds.specs if s.critical} == {"harmful_compliance"}
    assert ds.reads["harmful_compliance"] == "prompt+response"
    compliance = next(s for s in ds.specs if s.name == "harmful_compliance")
    assert set(compliance.members) == {
        "harmful_request.ensemble",
        "refusal.ensemble",
        "harmful_compliance.prompt_part",
        "harmful_compliance.answer_part",
    }
    assert compliance.members["harmful_compliance.answer_part"] > 0 and compliance.interactions
    for s in ds.specs:
        if s.component:
            continue
        assert "sample" in s.metrics
        assert "validation" in s.metrics or s.kind == "stack"  # a stack is scored out-of-fold, on other sources
        if s.kind != "stack":
            assert s.target_fpr == 0.01
    for d in ds.runtime:  # at most 32 SAE latents per SAE probe
        if d.spec.kind == "sae_probe":
            assert 0 < d.n_latent_cols <= 32


def test_sample_figures_reproduce_through_grpc(sidecar: ServerThread, bundle: Bundle, fixed_sample: Sample) -> None:
    ds = DetectorSet.from_bundle(bundle)
    hook = bundle.hook_points[0].name
    recorded = {s.name: s.metrics["sample"]["auroc"] for s in ds.specs if not s.component}
    fired = 0
    with MonitorClient(sidecar.target) as client:
        for beh, (rows, tokens, decision) in fixed_sample.items():
            served: dict[str, list[float]] = {}
            for i, (row, t, dec) in enumerate(zip(rows, tokens, decision, strict=True)):
                gen = Generation(
                    f"{beh}-{i}",
                    MODEL,
                    prompt=row.prompt,
                    output=row.response,
                    activations={hook: t},
                    decision={hook: dec},
                )
                reply = client.score(gen)
                local = {r.name: r.score for r in ds.score(hook, t, decision=dec)}
                for d in reply.detectors:
                    served.setdefault(d.detector, []).append(d.score)
                    assert d.score == pytest.approx(local[d.detector], abs=1e-6)  # the wire adds nothing
                    assert d.fired == (d.score >= d.threshold)
                    assert 0.0 <= d.probability <= 1.0
                    fired += d.fired
                    if d.fired and d.detector.endswith("sae_probe"):
                        # an alert explains itself: a label, or for latents of chat-template tokens (the
                        # decision position; the SAE's labeller leaves them unlabelled) an example context
                        top = d.top_features[0] if d.top_features else None
                        assert top is not None and (top.label or top.example), top
            y = np.array([r.label for r in rows])
            for name, scores in served.items():
                if name.split(".")[0] != beh:
                    continue  # other behaviours' detectors also score these rows; their figures are elsewhere
                got = auroc(y, np.array(scores))
                assert abs(got - recorded[name]) <= AUROC_TOLERANCE, f"{name}: {got:.4f} vs recorded {recorded[name]}"
    assert fired > 0
    m = sidecar.metrics()
    assert sample(m, "safety_monitor_generations_scored_total", rpc="Score") == sum(
        len(r) for r, _, _ in fixed_sample.values()
    )
    assert sum(v for (name, _), v in m.items() if name == "safety_monitor_detector_fired_total") == fired


def test_projected_mode_matches_full_activations(sidecar: ServerThread, fixed_sample: Sample) -> None:
    _rows, tokens, decision = fixed_sample["harmful_compliance"]
    with MonitorClient(sidecar.target) as client:
        catalog = client.get_detectors()
        hp = catalog.hook_points[0]
        assert hp.encoder_slice is not None
        sl = hp.encoder_slice
        assert len(sl.latent_ids) <= 5 * 32 and sl.dense_columns == 7 and sl.width == len(sl.latent_ids) + 7
        assert {d.kind for d in catalog.detector_infos} == {"sae_probe", "linear_probe", "ensemble", "stack"}
        for i in range(4):
            full = client.score(
                Generation(f"f{i}", MODEL, activations={hp.name: tokens[i]}, decision={hp.name: decision[i]})
            )
            proj = client.score(
                Generation(
                    f"p{i}",
                    MODEL,
                    activations={hp.name: sl.project(tokens[i])},
                    decision={hp.name: sl.project(decision[i])},
                    projected=True,
                )
            )
            a = {d.detector: d.score for d in full.detectors}
            b = {d.detector: d.score for d in proj.detectors}
            assert b == pytest.approx(a, abs=SCORE_TOLERANCE)
            assert "harmful_compliance" in a  # the decision row travelled, projected too
            assert proj.hook_stats[0].tokens == len(tokens[i])


def test_stream_halts_on_the_critical_detector(sidecar: ServerThread, bundle: Bundle, fixed_sample: Sample) -> None:
    ds = DetectorSet.from_bundle(bundle)
    critical = [s for s in ds.specs if s.critical]
    assert critical, "the default bundle marks a critical detector"
    hook = bundle.hook_points[0].name
    rows, tokens, decision = fixed_sample[critical[0].behaviour]
    name = critical[0].name
    scores = {i: {r.name: r for r in ds.score(hook, tokens[i], decision=decision[i])}[name] for i in range(len(rows))}
    by_score = sorted(scores, key=lambda i: -scores[i].score)
    top = next(i for i in by_score if scores[i].fired and len(tokens[i]) >= critical[0].halt_min_tokens)
    low = next(
        i
        for i in reversed(by_score)
        if not scores[i].fired and scores[i].recent_score < scores[i].threshold and len(tokens[i]) >= 8
    )
    with MonitorClient(sidecar.target) as client:
        for i, expect in ((top, True), (low, False)):
            with client.stream(f"s{i}", MODEL, prompt=rows[i].prompt) as s:
                t = tokens[i]
                verdicts = [s.send({hook: t[:4]}, decision={hook: decision[i]})]
                verdicts += [s.send({hook: t[j : j + 4]}) for j in range(4, len(t) - 4, 4)]
                verdicts.append(s.send({hook: t[len(verdicts) * 4 :]}, final=True))
            assert verdicts[-1].halt is expect
            final = {d.detector: d for d in verdicts[-1].detectors}
            assert final[critical[0].name].score == pytest.approx(scores[i].score, abs=1e-5)
            if expect:
                assert critical[0].name in verdicts[-1].reason
