"""Collection, training, feature analysis and the spliced LM-loss evaluation on the real model."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch

from monitor.models import load_default_model
from monitor.sae import _collect as collect_mod
from monitor.sae import load, save
from monitor.sae._analysis import analyze_features, load_reports, save_reports
from monitor.sae._collect import ActivationStore, CollectConfig, collect, load_conversations
from monitor.sae._evaluate import spliced_lm_loss
from monitor.sae._train import TrainConfig, train_sae

HOOK = "blocks.16.hook_resid_post"


@pytest.fixture(scope="module")
def model_and_tokenizer() -> tuple[object, object]:
    return load_default_model()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    convs = load_conversations(collect_mod.DEFAULT_CORPUS)[:48]
    path = tmp_path_factory.mktemp("corpus") / "c.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(c) + "\n" for c in convs)
    return path


def test_collect_skips_special_tokens_and_resumes_after_a_crash(
    model_and_tokenizer: tuple, corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tok = model_and_tokenizer
    cfg = CollectConfig(
        hook_points=(HOOK, "blocks.3.hook_resid_post"),
        max_tokens=1500,
        batch_size=4,
        shard_tokens=500,
        corpus=str(corpus),
    )
    real_write = collect_mod._write_shard
    calls = {"n": 0}

    def crash_after_first_shard(*a: object, **kw: object) -> None:  # a crash we cannot cause for real
        real_write(*a, **kw)  # type: ignore[arg-type]
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(collect_mod, "_write_shard", crash_after_first_shard)
    with pytest.raises(KeyboardInterrupt):
        collect(model, tok, cfg, tmp_path / "acts", progress=False)
    first = (tmp_path / "acts" / "shard_00000.safetensors").read_bytes()
    monkeypatch.setattr(collect_mod, "_write_shard", real_write)
    collect(model, tok, cfg, tmp_path / "acts", progress=False)
    assert (tmp_path / "acts" / "shard_00000.safetensors").read_bytes() == first
    store = ActivationStore(tmp_path / "acts")
    assert store.tokens == 1500
    d = store.load(HOOK, with_meta=True)
    assert d["acts"].shape == (1500, 576)
    special = set(tok.all_special_ids)
    assert not any(int(t) in special for t in d["token_ids"])
    # Every (document, position) pair appears once: the resumed run neither skipped nor repeated.
    pairs = set(zip(d["doc_ids"].tolist(), d["positions"].tolist(), strict=True))
    assert len(pairs) == 1500
    assert d["doc_ids"].diff().ge(0).all()
    # The injected "You are a helpful AI assistant named SmolLM" system prompt is not in the data.
    assert "SmolLM" not in tok.decode(d["token_ids"][:400].tolist())
    # The residual stream at layer 16 matches a plain forward pass of the first conversation.
    conv = load_conversations(corpus)[0]
    ids = tok(tok.apply_chat_template(conv["messages"], tokenize=False), return_tensors="pt", add_special_tokens=False)[
        "input_ids"
    ][:, :256]
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[17][0]
    first_doc = d["doc_ids"] == 0
    expected = hidden[d["positions"][first_doc].long()]
    torch.testing.assert_close(d["acts"][first_doc], expected, atol=0.05 * float(expected.abs().max()), rtol=0.01)


def test_train_analyse_and_splice_on_real_activations(model_and_tokenizer: tuple, corpus: Path, tmp_path: Path) -> None:
    model, tok = model_and_tokenizer
    cfg = CollectConfig(hook_points=(HOOK,), max_tokens=3000, batch_size=8, shard_tokens=4000, corpus=str(corpus))
    d = ActivationStore(collect(model, tok, cfg, tmp_path / "acts", progress=False)).load(HOOK, with_meta=True)
    sae, report = train_sae(
        d["acts"],
        TrainConfig(
            d_sae=256, steps=150, batch_size=512, lr=2e-3, l1_coefficient=2.0, lr_warmup_steps=10, l1_warmup_steps=30
        ),
        hook_point=HOOK,
        progress=False,
    )
    assert report.fve > 0.3 and 0 < report.l0 < 256
    folder = save(sae, tmp_path / "sae")
    reports = analyze_features(load(folder), d["acts"], d["token_ids"], d["doc_ids"], tok, top_k=3, progress=False)
    save_reports(reports, folder)
    loaded = load_reports(folder)
    alive = [r for r in loaded.values() if r.frequency > 0]
    assert len(loaded) == 256 and alive
    best = max(alive, key=lambda r: r.max_activation)
    assert best.top_examples and "[[" in best.top_examples[0].context
    assert best.top_examples[0].activation == pytest.approx(best.max_activation, rel=1e-3)
    held = load_conversations(corpus)[-4:]
    splice = spliced_lm_loss(model, tok, sae, held, progress=False)
    # A weak SAE costs loss, but far less than deleting the layer's output.
    assert splice.clean_loss < splice.spliced_loss < splice.zero_ablated_loss
    assert 0 < splice.loss_recovered < 1
