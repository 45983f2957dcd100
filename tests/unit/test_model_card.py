"""docs/model-card.md must say what the shipped bundle.yaml records: it is rendered from it."""

from __future__ import annotations

from pathlib import Path

import yaml

from monitor.detectors import Bundle
from monitor.detectors._card import recorded_results, render_model_card

ROOT = Path(__file__).resolve().parents[2]


def test_model_card_agrees_with_the_shipped_bundle() -> None:
    bundle = Bundle.load()
    notes = yaml.safe_load((ROOT / "docs/model-card-notes.yaml").read_text())
    want = render_model_card(bundle, recorded_results(bundle), notes)
    got = (ROOT / "docs/model-card.md").read_text()
    assert got == want, "docs/model-card.md and bundle.yaml disagree: run `monitor evaluate` to rewrite the card"


def test_every_detector_and_its_threshold_is_in_the_card() -> None:
    bundle = Bundle.load()
    card = (ROOT / "docs/model-card.md").read_text()
    for e in bundle.raw["detectors"]:
        assert f"`{e['name']}`" in card
        for split, m in (e.get("metrics") or {}).items():
            assert f"| {split} | {m['n']} ({m['positives']}) | {m['auroc']:.3f} |" in card, (e["name"], split)
    assert "Q4_1" in card  # provenance of the weights the detectors were fitted on
