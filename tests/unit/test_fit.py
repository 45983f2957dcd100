"""Fitting on pooled sources, and the critical threshold floor, on small synthetic data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from monitor.detectors._activations import LabeledRow
from monitor.detectors._fit import FitConfig, fit_behaviour, is_validation
from monitor.sae import SAE, SAEConfig

D, D_SAE = 16, 32


def _sae(rng: np.random.Generator) -> SAE:
    w = {
        "W_enc": torch.from_numpy(rng.normal(size=(D, D_SAE)).astype(np.float32) / 4),
        "b_enc": torch.zeros(D_SAE),
        "W_dec": torch.from_numpy(rng.normal(size=(D_SAE, D)).astype(np.float32)),
        "b_dec": torch.zeros(D),
    }
    return SAE.from_state(SAEConfig(D, D_SAE, hook_point="blocks.3.hook_resid_post", model_id="tiny"), w)


def _rows(rng: np.random.Generator, direction: np.ndarray) -> tuple[list[LabeledRow], list[np.ndarray]]:
    rows, tokens = [], []
    for source in ("a", "b", "c"):
        for i in range(60):
            for label in (0, 1):
                rows.append(LabeledRow("x", source, f"{source}-{i}", "p", "r", label))
                shift = (1.5 if label else -1.5) * direction
                tokens.append((rng.normal(size=(4, D)) + shift).astype(np.float32))
    return rows, tokens


def test_pooled_sources_are_fitted_on_and_named_in_provenance() -> None:
    rng = np.random.default_rng(3)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    rows, tokens = _rows(rng, direction)
    cfg = FitConfig("x", "a", ("c",), pooled_sources=("b",), latent_counts=(8,), sae_c=(0.1,), dense_c=(0.1,))
    fitted = fit_behaviour(cfg, rows, tokens, _sae(rng), log=lambda _: None)
    expected = sum(r.source in ("a", "b") and not is_validation(r.group) for r in rows)
    prov = fitted.specs[0].provenance
    assert prov["fit_rows"] == expected and prov["pooled_sources"] == ["b"]
    alone = fit_behaviour(replace(cfg, pooled_sources=()), rows, tokens, _sae(rng), log=lambda _: None)
    assert alone.specs[0].provenance["fit_rows"] == sum(r.source == "a" and not is_validation(r.group) for r in rows)


def test_critical_thresholds_are_never_below_probability_one_half() -> None:
    rng = np.random.default_rng(4)
    direction = rng.normal(size=D)
    direction /= np.linalg.norm(direction)
    rows, tokens = _rows(rng, 3 * direction)  # separable: the 1 % point sits far below P = 0.5
    small = {"latent_counts": (8,), "sae_c": (0.1,), "dense_c": (0.1,)}
    plain = fit_behaviour(FitConfig("x", "a", ("c",), **small), rows, tokens, _sae(rng), log=lambda _: None)
    critical = fit_behaviour(
        FitConfig("x", "a", ("c",), critical=True, **small), rows, tokens, _sae(rng), log=lambda _: None
    )
    for p, c in zip(plain.specs, critical.specs, strict=True):
        assert c.probability(c.threshold) >= 0.5 - 1e-6
        assert c.threshold >= p.threshold
    assert any(p.probability(p.threshold) < 0.5 for p in plain.specs)  # the floor changed something


def test_stack_fits_how_two_detectors_combine_and_is_calibrated_out_of_fold() -> None:
    """'Harmful AND not refused' is an interaction: the stack learns it from data, and its Platt map
    (fitted on out-of-fold logits) gives probabilities whose ECE on fresh rows is small."""
    from monitor.detectors._fit import fit_stack
    from monitor.detectors._metrics import auroc, expected_calibration_error

    rng = np.random.default_rng(5)

    def draw(n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        harmful, refused = rng.random(n) < 0.4, rng.random(n) < 0.3
        scores = {
            "harm": np.where(harmful, 2.0, -2.0) + rng.normal(size=n),
            "refusal": np.where(refused, 2.0, -2.0) + rng.normal(size=n),
        }
        return scores, (harmful & ~refused).astype(int)

    scores, y = draw(3000)
    fitted = fit_stack(scores, y, np.arange(len(y)).astype(str), pairs=(("harm", "refusal"),))
    assert fitted.members["harm"] > 0 and fitted.members["refusal"] < 0
    assert fitted.interactions[0][:2] == ("harm", "refusal") and fitted.cv_auroc > 0.95
    fresh, y2 = draw(3000)
    logit = fitted.bias + sum(c * fresh[m] for m, c in fitted.members.items())
    logit = logit + fitted.interactions[0][2] * fresh["harm"] * fresh["refusal"]
    p = 1 / (1 + np.exp(-(fitted.calibration[0] * logit + fitted.calibration[1])))
    assert auroc(y2, logit) > 0.95 and expected_calibration_error(y2, p) < 0.03
    naive = (1 / (1 + np.exp(-fresh["harm"]))) * (1 - 1 / (1 + np.exp(-fresh["refusal"])))
    assert expected_calibration_error(y2, p) < expected_calibration_error(y2, naive)


def test_evaluation_only_groups_are_never_fitted(monkeypatch: pytest.MonkeyPatch) -> None:
    from monitor.detectors import _fit

    rng = np.random.default_rng(4)
    direction = rng.normal(size=D)
    rows, tokens = _rows(rng, direction)
    cfg = FitConfig("x", "a", ("c",), latent_counts=(8,), sae_c=(0.1,), dense_c=(0.1,))
    fitted_groups = {r.group for r in rows if r.source == "a" and not is_validation(r.group)}
    held = set(sorted(fitted_groups)[:10])
    monkeypatch.setattr(_fit, "evaluation_only_groups", lambda: frozenset(held))
    fitted = fit_behaviour(cfg, rows, tokens, _sae(rng), log=lambda _: None)
    want = sum(r.source == "a" and not is_validation(r.group) and r.group not in held for r in rows)
    assert fitted.specs[0].provenance["fit_rows"] == want
