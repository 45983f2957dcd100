"""The shipped default SAE: loads from the bundle, and its card's figures hold on fresh tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from monitor.detectors import Bundle
from monitor.models import load_default_model
from monitor.sae import SAE
from monitor.sae._analysis import load_reports
from monitor.sae._collect import DEFAULT_CORPUS, ActivationStore, CollectConfig, collect, load_conversations
from monitor.sae._train import measure


@pytest.fixture(scope="module")
def sae() -> SAE:
    s = Bundle.load().load_sae()
    assert s is not None, "the default bundle must reference its SAE"
    return s


def test_default_sae_shape_and_provenance(sae: SAE) -> None:
    bundle = Bundle.load()
    assert sae.cfg.d_in == 576 and sae.cfg.d_sae >= 8 * 576
    assert sae.cfg.hook_point == bundle.hook_points[0].name
    assert sae.cfg.architecture in ("relu", "jumprelu") and sae.cfg.dtype == "float16"
    assert bundle.sae_path is not None
    meta = json.loads((bundle.sae_path / "sae.json").read_text())
    ev, tr = meta["evaluation"], meta["training"]
    assert tr["train_tokens"] >= 1_000_000
    assert ev["fve"] >= 0.80 and ev["l0"] <= 64 and ev["dead_fraction"] <= 0.10
    assert ev["loss_increase"] > 0 and 0 < ev["loss_recovered"] < 1
    card = (bundle.sae_path / "CARD.md").read_text()
    assert f"{ev['fve']:.3f}" in card and f"{ev['l0']:.1f}" in card
    reports = load_reports(bundle.sae_path)
    assert len(reports) == sae.cfg.d_sae
    assert sum(r.frequency > 0 for r in reports.values()) >= 0.9 * sae.cfg.d_sae


def test_card_figures_reproduce_on_unseen_conversations(sae: SAE, tmp_path: Path) -> None:
    """Tokens from the corpus's last conversations, which neither training nor the card used."""
    model, tok = load_default_model()
    convs = load_conversations(DEFAULT_CORPUS)
    subset = tmp_path / "c.jsonl"
    subset.write_text("".join(json.dumps(c) + "\n" for c in convs[-200:-64]))
    cfg = CollectConfig(hook_points=(sae.cfg.hook_point,), max_tokens=6000, batch_size=8, corpus=str(subset))
    acts = ActivationStore(collect(model, tok, cfg, tmp_path / "acts", progress=False)).load(sae.cfg.hook_point)
    figures = measure(sae, acts["acts"])
    meta = json.loads((Bundle.load().sae_path / "sae.json").read_text())  # type: ignore[operator]
    assert figures["fve"] == pytest.approx(meta["evaluation"]["fve"], abs=0.05)
    assert figures["l0"] == pytest.approx(meta["evaluation"]["l0"], rel=0.25)
