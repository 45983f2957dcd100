"""``monitor train-sae`` end to end: train, measure, analyse features, evaluate, write a card."""

from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from monitor.hook_points import layer_of
from monitor.sae._analysis import analyze_features, save_reports
from monitor.sae._collect import ActivationStore, load_conversations
from monitor.sae._config import SAEError
from monitor.sae._evaluate import spliced_lm_loss
from monitor.sae._formats import save
from monitor.sae._train import TrainConfig, TrainReport, train_sae

log = logging.getLogger("monitor.sae")
CARD = "CARD.md"


@dataclass(frozen=True)
class SAEBuildConfig:
    """Inputs of one ``train-sae`` run (see the command's ``--help`` for each field)."""

    activations: str
    out: str
    hook_point: str = "blocks.16.hook_resid_post"
    d_sae: int = 4608
    architecture: str = "relu"
    k: int | None = None
    steps: int = 3000
    batch_size: int = 4096
    lr: float = 4e-4
    l1_coefficient: float = 5.0
    target_l0: float | None = None
    eval_tokens: int = 200_000
    lm_eval_conversations: int = 64
    dtype: str = "float16"
    seed: int = 0


def build_sae(
    cfg: SAEBuildConfig, *, progress: bool = True, load_model: Callable[[], tuple[Any, Any]] | None = None
) -> str:
    """Run the whole build; returns the card's text (also written to ``out/CARD.md``).

    ``load_model`` returns ``(model, tokenizer)`` of the model the activations were collected from
    (the feature reports decode its tokens, the LM-loss evaluation runs it); default: the default model.
    """
    from monitor.models import load_default_model

    load = load_model or load_default_model
    torch.manual_seed(cfg.seed)
    store = ActivationStore(cfg.activations)
    data = store.load(cfg.hook_point, with_meta=True)
    acts = data["acts"]
    if acts.shape[0] <= cfg.eval_tokens + cfg.batch_size:
        raise SAEError(
            f"activations: {acts.shape[0]} tokens is too few for eval_tokens={cfg.eval_tokens} plus training"
        )
    train, held_out = acts[: -cfg.eval_tokens], acts[-cfg.eval_tokens :]
    model_id = str(store.manifest.config.get("model_id", ""))
    tcfg = TrainConfig(
        d_sae=cfg.d_sae,
        architecture=cfg.architecture,
        k=cfg.k,
        l1_coefficient=cfg.l1_coefficient,
        lr=cfg.lr,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        target_l0=cfg.target_l0,
        seed=cfg.seed,
        resample_at=tuple(int(cfg.steps * f) for f in (0.15, 0.3, 0.45)),
        lr_warmup_steps=max(cfg.steps // 30, 1),
        l1_warmup_steps=max(cfg.steps // 10, 1),
    )
    sae, report = train_sae(
        train, tcfg, hook_point=cfg.hook_point, model_id=model_id, eval_acts=held_out, progress=progress
    )
    sae.cfg = dataclasses.replace(sae.cfg, dtype=cfg.dtype)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = load()[1] if load_model is not None else _tokenizer()
    reports = analyze_features(sae, acts, data["token_ids"], data["doc_ids"], tokenizer, progress=progress)
    save_reports(reports, out)

    convs = load_conversations(store.manifest.config["corpus"])
    used = store.manifest.next_conversation
    held_convs = convs[len(convs) - cfg.lm_eval_conversations :]
    if len(convs) - cfg.lm_eval_conversations < used:
        raise SAEError(
            f"lm_eval_conversations: the last {cfg.lm_eval_conversations} conversations overlap the "
            f"{used} collected ones; collect fewer tokens or evaluate on fewer conversations"
        )
    model, tokenizer = load()
    splice = spliced_lm_loss(model, tokenizer, sae, held_convs, progress=progress)

    command = "monitor " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else "(python API)"
    evaluation = {
        "held_out_tokens": int(held_out.shape[0]),
        "fve": report.fve,
        "mse": report.mse,
        "l0": report.l0,
        "dead_fraction": report.dead_fraction,
        "lm_eval_conversations": splice.conversations,
        "lm_eval_tokens": splice.tokens,
        "clean_loss": splice.clean_loss,
        "spliced_loss": splice.spliced_loss,
        "zero_ablated_loss": splice.zero_ablated_loss,
        "loss_increase": splice.loss_increase,
        "loss_recovered": splice.loss_recovered,
    }
    training: dict[str, Any] = {
        "train_tokens": int(train.shape[0]),
        "tokens_seen": report.tokens_seen,
        "steps": report.steps,
        "seconds": round(report.seconds, 1),
        "final_l1_coefficient": report.l1_coefficient,
        "norm_scaling_factor": report.norm_scaling_factor,
        "config": dataclasses.asdict(tcfg),
        "collection": store.manifest.config,
        "command": command,
    }
    save(sae, out, extra={"training": training, "evaluation": evaluation})
    card = _card(cfg, report, evaluation, training, len(reports), sae.cfg.d_in)
    (out / CARD).write_text(card)
    (out / "history.json").write_text(json.dumps(report.history))
    return card


def _tokenizer() -> object:
    from transformers import AutoTokenizer

    from monitor.models import default_model_cache, load_default_model

    folder = default_model_cache()
    if not (folder / "tokenizer.json").is_file():
        load_default_model()
    return AutoTokenizer.from_pretrained(folder)


def _card(
    cfg: SAEBuildConfig, report: TrainReport, ev: dict[str, float], tr: dict[str, Any], n_latents: int, d_in: int
) -> str:
    goals = [
        ("FVE >= 0.80", ev["fve"] >= 0.80),
        ("L0 <= 64", ev["l0"] <= 64),
        ("dead latents <= 10 %", ev["dead_fraction"] <= 0.10),
    ]
    steer = f" steered toward L0 {cfg.target_l0} (final {report.l1_coefficient:.3g})" if cfg.target_l0 else ""
    lines = [
        f"# SAE card: {cfg.architecture} SAE, {cfg.d_sae} latents, {cfg.hook_point}",
        "",
        f"- **Model**: {tr['collection'].get('model_id', '')}; hook point `{cfg.hook_point}` (output of decoder "
        f"layer {layer_of(cfg.hook_point)}, d_in {d_in}).",
        "- **Data**: `data/chat_corpus/conversations.jsonl.gz` (GSM8K, GPTeacher, HH-RLHF harmless; see its "
        "SOURCE.md), rendered with the model's chat template; special tokens and the injected system prompt skipped.",
        f"- **Tokens**: {tr['train_tokens']:,} training tokens, {report.tokens_seen:,} seen in {report.steps} steps "
        f"of {cfg.batch_size}; the {ev['held_out_tokens']:,} tokens collected after them are held out for the "
        "figures below.",
        f"- **Command**: `{tr['command']}` ({tr['seconds']} s of training on this machine's CPU).",
        f"- **Recipe**: Adam lr {cfg.lr}, L1 {cfg.l1_coefficient}{steer}, unit-norm decoder rows, grad clip 1.0, "
        f"lr and L1 warm-up, dead-latent resampling; inputs scaled by {report.norm_scaling_factor:.4g} (folded into "
        f"the weights, so the SAE reads raw activations); stored as {cfg.dtype}.",
        "",
        "| figure (held-out tokens) | value |",
        "|---|---|",
        f"| fraction of variance explained (FVE) | {ev['fve']:.3f} |",
        f"| reconstruction MSE (per element, raw scale) | {ev['mse']:.4g} |",
        f"| L0 (mean active latents per token) | {ev['l0']:.1f} |",
        f"| dead latents (never active on the held-out tokens) | {ev['dead_fraction']:.1%} |",
        f"| LM loss clean / spliced / zero-ablated (nats; {ev['lm_eval_conversations']} held-out conversations, "
        f"{ev['lm_eval_tokens']:,} tokens) | {ev['clean_loss']:.3f} / {ev['spliced_loss']:.3f} / "
        f"{ev['zero_ablated_loss']:.3f} |",
        f"| LM-loss increase when spliced | {ev['loss_increase']:+.3f} nats |",
        f"| loss recovered | {ev['loss_recovered']:.1%} |",
        "",
        "Goals: " + "; ".join(f"{g} {'met' if ok else '**missed**'}" for g, ok in goals) + ".",
        "",
        f"Feature reports (frequency, mean/max activation, decoder norm, top-5 contexts) for all {n_latents} "
        "latents are in `features.json.gz`.",
        "",
    ]
    return "\n".join(lines)
