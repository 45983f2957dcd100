"""Teacher-forced labeled activations: the kept rows are the decision position and the response."""

from __future__ import annotations

import torch

from monitor.detectors._activations import LabeledRow, load_rows, response_activations
from monitor.models import load_default_model
from monitor.text import load_lexicon

HOOK = "blocks.16.hook_resid_post"


def test_response_rows_match_a_plain_forward_pass() -> None:
    model, tok = load_default_model()
    rows = [
        LabeledRow("deception", "t", "g0", "Is the sky green?", "No, the sky is blue on a clear day.", 0),
        LabeledRow("deception", "t", "g0", "Is the sky green?", "Yes.", 1),
        LabeledRow("deception", "t", "g1", "Name a prime number larger than ten, please.", "Eleven.", 0),
    ]
    acts = response_activations(model, tok, rows, HOOK, batch_size=3, progress=False)
    for row, a in zip(rows, acts, strict=True):
        prefix = tok.apply_chat_template(
            [{"role": "user", "content": row.prompt}], tokenize=False, add_generation_prompt=True
        )
        n_prefix = len(tok(prefix, add_special_tokens=False)["input_ids"])
        n_resp = len(tok(row.response, add_special_tokens=False)["input_ids"])
        assert a.shape == (1 + n_resp, 576)
        ids = tok(prefix + row.response, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[17][0]
        torch.testing.assert_close(a, hidden[n_prefix - 1 : n_prefix + n_resp], atol=1e-3, rtol=1e-3)


def test_shipped_labeled_sets_are_grouped_and_balanced() -> None:
    for behaviour, sources in (
        ("deception", {"repe", "truthfulqa_roleplay", "truthfulqa", "gsm8k_roleplay"}),
        ("sycophancy", {"truthfulqa_opinion", "typology", "gsm8k_opinion", "flattery_math", "flattery_code"}),
    ):
        rows = load_rows(behaviour)
        assert {r.source for r in rows} == sources
        by_group: dict[str, list[int]] = {}
        for r in rows:
            by_group.setdefault(r.group, []).append(r.label)
        # Every prompt appears once with each label: a split by group keeps both sides together.
        assert all(sorted(labels) == [0, 1] for labels in by_group.values())
    refusal = load_rows("refusal")
    assert {r.source for r in refusal} == {"refusal_direction", "hh_rlhf_tqa"}
    # labels by construction: written refusals are 1, the model's own (non-refusing) answers 0
    phrases = load_lexicon("refusal")
    for r in refusal:
        if r.label == 0:
            assert not any(p in r.response.lower() for p in phrases), r.response
