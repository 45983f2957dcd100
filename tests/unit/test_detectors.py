"""Detector scoring on a small synthetic bundle: every kind against a numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from monitor.detectors import Bundle, BundleError, DetectorSet
from monitor.detectors._metrics import auroc, recall_at_fpr, threshold_at_fpr
from monitor.detectors._scoring import ProbeWeights, save_probe_weights
from monitor.pipeline import ActivationInput, ChunkInput, Pipeline, ScoreInput
from monitor.sae import SAE, SAEConfig, save
from monitor.tensors import encode

D, D_SAE, HOOK = 16, 32, "blocks.3.hook_resid_post"
rng = np.random.default_rng(7)
LATENTS = np.array([1, 5, 7, 20])


def _sae() -> SAE:
    w = {
        "W_enc": rng.normal(size=(D, D_SAE)).astype(np.float32) / 4,
        "b_enc": rng.normal(size=D_SAE).astype(np.float32) / 4,
        "W_dec": rng.normal(size=(D_SAE, D)).astype(np.float32),
        "b_dec": rng.normal(size=D).astype(np.float32) / 4,
    }
    cfg = SAEConfig(D, D_SAE, hook_point=HOOK, model_id="tiny")
    return SAE.from_state(cfg, {k: torch.from_numpy(v) for k, v in w.items()})


SAE_W = rng.normal(size=len(LATENTS)).astype(np.float32)
LIN_W = rng.normal(size=D).astype(np.float32) / 3


def _entry(name: str, kind: str, aggregation: str, **extra: object) -> dict[str, object]:
    return {
        "name": name,
        "behaviour": "deception",
        "kind": kind,
        "hook_point": HOOK,
        "aggregation": aggregation,
        "threshold": 0.1,
        "target_fpr": 0.01,
        "calibration": {"slope": 2.0, "intercept": -0.5},
        **extra,
    }


def write_bundle(folder: Path, entries: list[dict[str, object]] | None = None) -> Path:
    save(_sae(), folder / "sae")
    manifest = {
        "format_version": 1,
        "name": "tiny",
        "version": "0",
        "model": "tiny-model",
        "hook_points": [{"name": HOOK, "layer": 3, "d_model": D}],
        "sae": {"path": "sae"},
        "detectors": entries
        if entries is not None
        else [
            _entry("d.sae", "sae_probe", "mean"),
            _entry("d.lin", "linear_probe", "mean"),
            _entry("d.ens", "ensemble", "max", members={"d.sae": 0.7, "d.lin": 0.5}, bias=-0.2, critical=True),
        ],
    }
    (folder / "bundle.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    save_probe_weights(
        folder / "detectors.safetensors",
        {"d.sae": ProbeWeights(SAE_W, 0.3, LATENTS), "d.lin": ProbeWeights(LIN_W, -0.1)},
    )
    return folder


@pytest.fixture
def bundle(tmp_path: Path) -> Bundle:
    return Bundle.load(write_bundle(tmp_path))


def reference(bundle: Bundle, x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-token scores computed the slow way: full SAE encode, then the probes."""
    z = bundle.load_sae().encode(torch.from_numpy(x)).numpy()
    s_sae = z[:, LATENTS] @ SAE_W + 0.3
    s_lin = x @ LIN_W - 0.1
    return {"d.sae": s_sae, "d.lin": s_lin, "d.ens": 0.7 * s_sae + 0.5 * s_lin - 0.2}


def test_each_kind_matches_the_full_encode_reference(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    x = rng.normal(size=(9, D)).astype(np.float32)
    ref = reference(bundle, x)
    got = {r.name: r for r in ds.score(HOOK, x)}
    assert got["d.sae"].score == pytest.approx(ref["d.sae"].mean(), abs=1e-5)
    assert got["d.lin"].score == pytest.approx(ref["d.lin"].mean(), abs=1e-5)
    assert got["d.ens"].score == pytest.approx(ref["d.ens"].max(), abs=1e-5)
    for r in got.values():  # calibrated with slope 2.0, intercept -0.5
        assert r.probability == pytest.approx(1 / (1 + np.exp(-(2.0 * r.score - 0.5))))
    # contributions: mean latent activation x weight, positive ones, largest first
    z = bundle.load_sae().encode(torch.from_numpy(x)).numpy()[:, LATENTS].mean(0)
    expected = sorted(((float(v), int(lat)) for lat, v in zip(LATENTS, z * SAE_W, strict=True) if v > 0), reverse=True)
    assert [(round(c.contribution, 5), c.latent) for c in got["d.sae"].top_features] == [
        (round(v, 5), lat) for v, lat in expected[:3]
    ]


def test_a_mean_detector_fires_on_the_mean_over_tokens_not_on_one_token(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    unit = LIN_W / float(LIN_W @ LIN_W)  # a token c * unit gives the linear probe the score c - 0.1

    def lin(*scores: float) -> tuple[float, bool]:
        x = np.stack([(s + 0.1) * unit for s in scores]).astype(np.float32)
        r = next(r for r in ds.score(HOOK, x) if r.name == "d.lin")
        return r.score, r.fired

    # threshold 0.1: just above and just below it
    assert lin(0.11, 0.11) == (pytest.approx(0.11, abs=1e-4), True)
    assert lin(0.09, 0.09) == (pytest.approx(0.09, abs=1e-4), False)
    # one token far above the threshold does not fire a mean detector whose mean is below it ...
    assert lin(0.9, -0.5, -0.5, -0.5) == (pytest.approx(-0.15, abs=1e-4), False)
    # ... and one token far below does not silence one whose mean is above it
    assert lin(-0.3, 0.3, 0.3, 0.3) == (pytest.approx(0.15, abs=1e-4), True)


def test_projected_mode_gives_the_same_scores(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    proj = ds.projection(HOOK)
    assert proj is not None and proj.width == len(LATENTS) + 1 and proj.n_latents == len(LATENTS)
    x = rng.normal(size=(5, D)).astype(np.float32)
    full = {r.name: r.score for r in ds.score(HOOK, x)}
    projected = {r.name: r.score for r in ds.score(HOOK, proj.project(x), projected=True)}
    assert projected == pytest.approx(full, abs=1e-5)


def test_stream_aggregation_equals_one_shot_and_ema_matches_a_loop(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    x = rng.normal(size=(23, D)).astype(np.float32)
    running = ds.open_running()
    for a, b in ((0, 4), (4, 5), (5, 17), (17, 23)):
        running.update(HOOK, ds.features(HOOK, x[a:b]))  # type: ignore[arg-type]
    streamed = {r.name: r for r in running.results()}
    once = {r.name: r for r in ds.score(HOOK, x)}
    for name in once:
        assert streamed[name].score == pytest.approx(once[name].score, abs=1e-5)
    s = reference(bundle, x)["d.lin"]
    alpha = 1 - 0.5 ** (1 / 16)
    e = 0.0
    for v in s:
        e += alpha * (v - e)
    corrected = e / (1 - (1 - alpha) ** len(s))  # bias-corrected: a weighted mean of the tokens so far
    assert streamed["d.lin"].recent_score == pytest.approx(corrected, abs=1e-5)
    assert streamed["d.lin"].tokens == 23


def test_pipeline_halts_a_stream_when_a_critical_detector_fires(bundle: Bundle) -> None:
    ds = DetectorSet.from_bundle(bundle)
    ens = next(d for d in ds.runtime if d.spec.name == "d.ens")
    p = Pipeline(bundle, detectors=ds)
    # benign tokens first (far below the threshold), then tokens pushed along the ensemble's dense direction
    direction = LIN_W / np.linalg.norm(LIN_W)
    low = (-3 * direction + 0.01 * rng.normal(size=(6, D))).astype(np.float32)
    high = (6 * direction + 0.01 * rng.normal(size=(6, D))).astype(np.float32)
    assert float((ds.token_scores("d.ens", ds.features(HOOK, low)) >= ens.spec.threshold).mean()) < 1  # type: ignore[arg-type]
    stream = p.open_stream()
    v1 = stream.update(ChunkInput("r1", "tiny-model", activations=[ActivationInput(HOOK, encode(low))]))
    v2 = stream.update(ChunkInput("r1", activations=[ActivationInput(HOOK, encode(high))]))
    v3 = stream.update(ChunkInput("r1", activations=[ActivationInput(HOOK, encode(low))], final=True))
    assert not next(d for d in v1.detectors if d.name == "d.ens").fired and not v1.halt  # benign: no HALT yet
    assert v2.halt and v2.halted_now and "d.ens fired" in v2.reason
    assert v3.halt and not v3.halted_now  # HALT is sticky and counted once
    r = p.score(ScoreInput("r2", "tiny-model", activations=[ActivationInput(HOOK, encode(high))]))
    assert r.flagged and {d.name for d in r.detectors} == {"d.sae", "d.lin", "d.ens"}


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([_entry("a", "svm", "mean")], "kind: expected one of"),
        ([_entry("a", "linear_probe", "median")], "aggregation: expected one of"),
        ([_entry("a", "ensemble", "mean")], "members: expected at least one member"),
        ([_entry("a", "ensemble", "mean", members={"nope": 1.0})], "member 'nope' is not a probe"),
        ([_entry("x", "linear_probe", "mean")], "expected weights for detector 'x'"),
        ([{"name": "a", "kind": "linear_probe"}], "detectors[0]: missing or malformed key"),
    ],
)
def test_bad_detector_entries_are_named(tmp_path: Path, entries: list[dict[str, object]], message: str) -> None:
    with pytest.raises(BundleError, match=message.replace("[", r"\[")):
        DetectorSet.from_bundle(Bundle.load(write_bundle(tmp_path, entries)))


def test_metrics_agree_with_sklearn() -> None:
    from sklearn.metrics import roc_auc_score

    y = rng.integers(0, 2, size=500)
    s = np.round(rng.normal(size=500) + y, 1)  # rounding makes ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    neg = rng.normal(size=1000)
    thr = threshold_at_fpr(neg, 0.01)
    assert (neg >= thr).mean() <= 0.01
    assert (neg >= np.nextafter(thr, -np.inf)).mean() > 0.0
    ties = np.r_[np.zeros(990), np.ones(10) * 2.0]  # most negatives tied at 0: the threshold must go above them
    assert (ties >= threshold_at_fpr(ties, 0.01)).mean() <= 0.01
    assert recall_at_fpr(np.r_[np.zeros(1000), np.ones(5)], np.r_[ties, np.zeros(5)]) == 0.0
    perfect = recall_at_fpr(np.r_[np.zeros(100), np.ones(10)], np.r_[np.zeros(100), np.ones(10)])
    assert perfect == 1.0


STACK = {"members": {"d.harm": 1.5, "d.lin": -0.8}, "bias": -0.3, "interactions": [["d.harm", "d.lin", -0.4]]}


def _decision_bundle(folder: Path) -> Bundle:
    """d.lin reads the response; d.harm reads the decision row; d.comp is a stack fitted on both."""
    entries = [
        _entry("d.lin", "linear_probe", "mean"),
        {**_entry("d.harm", "linear_probe", "mean"), "behaviour": "harmful_request", "position": "decision"},
        {
            **_entry("d.comp", "stack", "mean", critical=True, **STACK),
            "behaviour": "harmful_compliance",
            "threshold": 0.5,
            "halt_min_tokens": 4,
        },
    ]
    write_bundle(folder, entries)
    save_probe_weights(
        folder / "detectors.safetensors",
        {"d.lin": ProbeWeights(LIN_W, -0.1), "d.harm": ProbeWeights(LIN_W[::-1].copy(), 0.2)},
    )
    return Bundle.load(folder)


def test_decision_row_feeds_prompt_detectors_and_the_stack(tmp_path: Path) -> None:
    bundle = _decision_bundle(tmp_path)
    ds = DetectorSet.from_bundle(bundle)
    x = rng.normal(size=(6, D)).astype(np.float32)
    dec = rng.normal(size=(1, D)).astype(np.float32) * 3
    without = {r.name: r for r in ds.score(HOOK, x)}
    assert set(without) == {"d.lin"}  # no decision row: the prompt detector and the stack stay silent
    got = {r.name: r for r in ds.score(HOOK, x, decision=dec)}
    harm = float(dec[0] @ LIN_W[::-1] + 0.2)
    assert got["d.harm"].score == pytest.approx(harm, rel=1e-5)
    lin = float((x @ LIN_W - 0.1).mean())
    logit = -0.3 + 1.5 * harm - 0.8 * lin - 0.4 * harm * lin  # the fitted model on the members' scores
    assert got["d.comp"].score == pytest.approx(logit, rel=1e-5)
    assert got["d.comp"].probability == pytest.approx(1 / (1 + np.exp(-(2 * logit - 0.5))), rel=1e-6)
    assert got["d.comp"].tokens == 6 and got["d.comp"].fired == (logit >= 0.5)
    assert (got["d.harm"].reads, got["d.lin"].reads, got["d.comp"].reads) == ("prompt", "response", "prompt+response")
    # the same through the pipeline, on Score and on a stream (decision row with the first chunk)
    p = Pipeline(bundle, detectors=ds)
    r = p.score(
        ScoreInput(
            "r",
            "tiny-model",
            activations=[ActivationInput(HOOK, encode(x))],
            decision=[ActivationInput(HOOK, encode(dec))],
        )
    )
    assert {d.name: d.score for d in r.detectors}["d.comp"] == pytest.approx(got["d.comp"].score, rel=1e-6)
    stream = p.open_stream()
    stream.update(
        ChunkInput(
            "s",
            "tiny-model",
            activations=[ActivationInput(HOOK, encode(x[:3]))],
            decision=[ActivationInput(HOOK, encode(dec))],
        )
    )
    v = stream.update(ChunkInput("s", activations=[ActivationInput(HOOK, encode(x[3:]))], final=True))
    assert {d.name: d.score for d in v.detectors}["d.comp"] == pytest.approx(got["d.comp"].score, rel=1e-6)


def test_a_critical_prompt_detector_is_refused_at_load(tmp_path: Path) -> None:
    """A detector that reads only the decision row describes the request: it may warn, never halt."""
    entries = [{**_entry("d.intent", "linear_probe", "mean"), "position": "decision", "critical": True}]
    write_bundle(tmp_path, entries)
    save_probe_weights(tmp_path / "detectors.safetensors", {"d.intent": ProbeWeights(LIN_W, 0.0)})
    with pytest.raises(BundleError, match=r"d\.intent: critical, but it reads only the prompt"):
        DetectorSet.from_bundle(Bundle.load(tmp_path))


def test_a_firing_prompt_detector_never_halts_but_the_stack_reading_the_answer_does(tmp_path: Path) -> None:
    """The prompt detector fires on the first chunk and the stream goes on; the stack (which reads
    the answer) halts, and only once halt_min_tokens response tokens are in."""
    _decision_bundle(tmp_path)
    raw = yaml.safe_load((tmp_path / "bundle.yaml").read_text())
    raw["detectors"][1]["threshold"] = -1e9  # d.harm fires on any decision row
    raw["detectors"][2]["threshold"] = -1e9  # d.comp fires whatever it reads
    (tmp_path / "bundle.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    p = Pipeline(Bundle.load(tmp_path))
    x = rng.normal(size=(6, D)).astype(np.float32)
    dec = [ActivationInput(HOOK, encode(rng.normal(size=(1, D)).astype(np.float32)))]
    stream = p.open_stream()
    v1 = stream.update(ChunkInput("s", "tiny-model", activations=[ActivationInput(HOOK, encode(x[:2]))], decision=dec))
    by = {d.name: d for d in v1.detectors}
    assert by["d.harm"].fired and by["d.comp"].fired and by["d.comp"].tokens == 2 and not v1.halt
    v2 = stream.update(ChunkInput("s", activations=[ActivationInput(HOOK, encode(x[2:]))], final=True))
    assert v2.halt and v2.halted_now and v2.reason.startswith("d.comp fired")
    # with the stack gone, the firing prompt detector alone never halts
    del raw["detectors"][2]
    (tmp_path / "bundle.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    stream = Pipeline(Bundle.load(tmp_path)).open_stream()
    stream.update(ChunkInput("s", "tiny-model", activations=[ActivationInput(HOOK, encode(x[:3]))], decision=dec))
    v = stream.update(ChunkInput("s", activations=[ActivationInput(HOOK, encode(x[3:]))], final=True))
    assert next(d for d in v.detectors if d.name == "d.harm").fired and not v.halt


@pytest.mark.parametrize(
    ("rows", "field", "expected"),
    [
        (2, "decision[0].activations.shape[0] (tokens)", "exactly 1"),
        (1, "decision[1].hook_point", "at most once"),
    ],
)
def test_bad_decision_rows_are_named(tmp_path: Path, rows: int, field: str, expected: str) -> None:
    from monitor.errors import InvalidInput

    bundle = _decision_bundle(tmp_path)
    p = Pipeline(bundle)
    dec = [ActivationInput(HOOK, encode(np.zeros((rows, D), np.float32)))] * (1 if rows == 2 else 2)
    with pytest.raises(InvalidInput) as exc:
        p.score(
            ScoreInput(
                "r",
                "tiny-model",
                activations=[ActivationInput(HOOK, encode(np.zeros((2, D), np.float32)))],
                decision=dec,
            )
        )
    assert exc.value.field == field and expected in str(exc.value)


def test_one_gemm_per_hook_point_scores_as_each_detector_alone() -> None:
    """``RunningScores`` scores every response detector of a hook point with one [K, m] GEMM: the
    aggregates equal each detector's own ``token_scores`` (sum, max and EMA), over two updates."""
    import numpy as np

    from monitor.detectors import Bundle, DetectorSet
    from monitor.detectors._scoring import RunningScores

    ds = DetectorSet.from_bundle(Bundle.load())
    hp = next(iter(ds.projections))
    rng = np.random.default_rng(0)
    parts = [ds.features(hp, rng.normal(size=(n, 576)).astype(np.float32)) for n in (37, 5)]
    run = RunningScores(ds)
    for f in parts:
        run.update(hp, f)
    checked = 0
    for i, det in enumerate(ds.runtime):
        if det.spec.hook_point != hp or det.spec.position == "decision":
            continue
        s = np.concatenate([det.token_scores(f).astype(np.float64) for f in parts])
        a = float(run.alpha[i])
        ema = float(((1 - a) ** np.arange(len(s) - 1, -1, -1) * a) @ s)
        assert run.sum[i] == pytest.approx(s.sum(), rel=1e-5, abs=1e-4), det.spec.name
        assert run.max[i] == pytest.approx(s.max(), rel=1e-5, abs=1e-5), det.spec.name
        assert run.ema[i] == pytest.approx(ema, rel=1e-5, abs=1e-5), det.spec.name
        assert run.count[i] == len(s)
        checked += 1
    assert checked >= 10
