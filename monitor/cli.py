"""The ``monitor`` command line: ``serve`` (the sidecar), ``collect``, ``train-sae``, ``train-detectors``,
``evaluate``, ``bundle build``, ``baseline`` and ``demo``; each imports its heavy modules only when it runs."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from typing import Any

from monitor import __version__
from monitor.errors import MonitorError


def _serve(ns: argparse.Namespace) -> int:
    from monitor.config import load_config
    from monitor.server import serve

    config = load_config(
        ns.config,
        overrides={
            "host": ns.host,
            "port": ns.port,
            "metrics_host": ns.metrics_host,
            "metrics_port": ns.metrics_port,
            "bundle": ns.bundle,
            "log_level": ns.log_level,
            "drift_state": ns.drift_state,
            "drift_state_strict": ns.drift_state_strict,
            "drift_baseline": ns.drift_baseline,
            "audit_log": ns.audit_log,
            "critic_url": ns.critic_url,
            "critique_mode": ns.critique_mode,
            "constitution": ns.constitution,
            "tls_cert": ns.tls_cert,
            "tls_key": ns.tls_key,
            "tls_client_ca": ns.tls_client_ca,
            "debate_url": ns.debate_url,
            "otlp_endpoint": ns.otlp_endpoint,
        },
    )
    logging.getLogger().setLevel(config.log_level.upper())
    return asyncio.run(serve(config))


def _collect(ns: argparse.Namespace) -> int:
    from monitor.models import DEFAULT_MODEL_ID, load_default_model
    from monitor.sae._collect import CollectConfig, collect

    cfg = CollectConfig(
        hook_points=tuple(ns.hook_point),
        max_tokens=ns.tokens,
        context_size=ns.context_size,
        batch_size=ns.batch_size,
        shard_tokens=ns.shard_tokens,
        dtype=ns.dtype,
        corpus=ns.corpus,
        model_id=DEFAULT_MODEL_ID,
    )
    model, tokenizer = load_default_model()
    collect(model, tokenizer, cfg, ns.out)
    print(f"activations in {ns.out}")
    return 0


def _train_sae(ns: argparse.Namespace) -> int:
    from monitor.sae._pipeline import SAEBuildConfig, build_sae

    cfg = SAEBuildConfig(
        activations=ns.activations,
        out=ns.out,
        hook_point=ns.hook_point,
        d_sae=ns.d_sae,
        architecture=ns.architecture,
        k=ns.k,
        steps=ns.steps,
        batch_size=ns.batch_size,
        lr=ns.lr,
        l1_coefficient=ns.l1_coefficient,
        target_l0=ns.target_l0,
        eval_tokens=ns.eval_tokens,
        lm_eval_conversations=ns.lm_eval_conversations,
        dtype=ns.dtype,
        seed=ns.seed,
    )
    card = build_sae(cfg)
    print(card)
    return 0


def _train_detectors(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor.detectors import default_bundle_path
    from monitor.detectors._evaluate import RECIPES, build_detectors
    from monitor.models import load_default_model

    unknown = sorted(set(ns.behaviour or ()) - set(RECIPES))
    if unknown:  # checked here, not by argparse: listing the choices would import torch for every command
        raise MonitorError(f"--behaviour: expected one of {', '.join(RECIPES)}, got {', '.join(unknown)}")
    bundle = Path(ns.bundle) if ns.bundle else default_bundle_path()
    results = build_detectors(bundle, Path(ns.cache), load_default_model, behaviours=ns.behaviour or tuple(RECIPES))
    for per_det in results.values():
        for name, splits in per_det.items():
            for split, m in splits.items():
                print(f"{name:28} {split:26} n={m.n:5d} AUROC {m.auroc:.3f} R@1%FPR {m.recall_at_1pct_fpr:.3f}")
    print(f"wrote detectors into {bundle}; run `monitor evaluate` to write the model card")
    return 0


def _evaluate(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor.detectors import Bundle
    from monitor.detectors._card import recorded_results, render_model_card, write_model_card
    from monitor.detectors._evaluate import compare_with_manifest, evaluate_bundle
    from monitor.models import load_default_model

    bundle = Bundle.load(ns.bundle)
    results = evaluate_bundle(bundle, Path(ns.cache), load_default_model, behaviours=ns.behaviour)
    notes: dict[str, str] = {}
    if ns.notes and Path(ns.notes).is_file():
        import yaml

        notes = yaml.safe_load(Path(ns.notes).read_text()) or {}
    # The card shows what bundle.yaml records (a test holds them equal); the measurement above
    # checks that those records still hold.
    write_model_card(Path(ns.card), render_model_card(bundle, recorded_results(bundle), notes))
    print(f"wrote {ns.card}")
    problems = compare_with_manifest(bundle, results, ns.tolerance)
    for p in problems:
        print(f"differs from the bundle: {p}", file=sys.stderr)
    return 1 if problems else 0


def _bundle_build(ns: argparse.Namespace) -> int:
    from pathlib import Path

    from monitor.bundling import BuildConfig, SAETraining, build_bundle

    training = None
    if ns.d_sae is not None:
        training = SAETraining(
            d_sae=ns.d_sae,
            tokens=ns.sae_tokens,
            architecture=ns.sae_architecture,
            steps=ns.sae_steps,
            batch_size=ns.sae_batch_size,
            lr=ns.sae_lr,
            l1_coefficient=ns.sae_l1_coefficient,
            target_l0=ns.sae_target_l0,
            eval_tokens=ns.sae_eval_tokens,
            lm_eval_conversations=ns.sae_lm_eval_conversations,
        )
    cfg = BuildConfig(
        model=ns.model,
        hook_points=tuple(ns.hook_point),
        out=Path(ns.out),
        work=Path(ns.work) if ns.work else None,
        sae=ns.sae,
        training=training,
        engine=ns.engine,
        vllm_python=ns.vllm_python,
        tensor_parallel_size=ns.tensor_parallel_size,
        max_new_tokens=ns.max_new_tokens,
        generation_batch_size=ns.batch_size,
        limit=ns.limit,
        model_id=ns.model_id,
        aliases=tuple(ns.alias or ()),
        name=ns.name,
        version=ns.version,
        dtype=ns.dtype,
        device=ns.device,
    )
    build_bundle(cfg)
    return 0


def _baseline(ns: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from monitor.drift import DriftConfig, DriftMonitor
    from monitor.text import text_statistics

    path = Path(ns.traffic)
    if not path.is_file():
        raise MonitorError(f"--traffic: expected a JSONL file of {{prompt, output}} rows, got {path}")
    samples: dict[str, list[float]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(tqdm(f, desc="baseline", unit=" rows"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                output, prompt = row["output"], row.get("prompt", "")
            except (ValueError, KeyError, TypeError) as exc:
                raise MonitorError(f"{path}:{n}: expected a JSON object with 'output' (and 'prompt'): {exc}") from exc
            for k, v in text_statistics(str(prompt), str(output)).items():
                samples.setdefault(f"text.{k}", []).append(v)
    if not samples:
        raise MonitorError(f"{path}: no rows")
    mon = DriftMonitor(DriftConfig(reference_size=ns.reference_events))
    mon.set_reference(samples)
    mon.save(ns.out)
    rows = len(next(iter(samples.values())))
    print(f"baseline of {rows} responses, {len(samples)} statistics -> {ns.out}")
    print("use it with: monitor serve --drift-baseline", ns.out, "(detector metrics start from live traffic)")
    return 0


def _debate_experiment(ns: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from tqdm import tqdm

    from monitor.critique import InProcessBackend, OpenAIChatBackend
    from monitor.debate import load_questions, run_experiment, summary_table

    questions = load_questions(ns.questions) if ns.questions else load_questions()
    backend: Any = (
        OpenAIChatBackend(ns.backend_url, ns.model, timeout=ns.timeout) if ns.backend_url else InProcessBackend()
    )
    out = Path(ns.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    bar = tqdm(total=ns.trials, desc="debate trials", unit=" trials")

    def progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per backend call drowns the bar

    async def experiment(f: Any) -> dict[str, Any]:
        try:
            return await run_experiment(
                backend,
                backend,
                questions,
                trials=ns.trials,
                rounds=ns.rounds,
                max_tokens=ns.max_tokens,
                seed=ns.seed,
                out=f,
                progress=progress,
            )
        finally:
            if hasattr(backend, "aclose"):
                await backend.aclose()

    with out.open("w", encoding="utf-8") as f:
        summary = asyncio.run(experiment(f))
    bar.close()
    out.with_suffix(".summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(summary_table(summary))
    print(
        f"n={summary['trials']} rounds={summary['rounds']} max_tokens={summary['max_tokens']} seed={summary['seed']} "
        f"backend={summary['backend']} honest as proposer {summary['honest_as_proposer']}/{summary['trials']} "
        f"mean judge confidence {summary['mean_judge_confidence']} in {summary['seconds']} s"
    )
    print(f"trials in {out}, summary in {out.with_suffix('.summary.json')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="monitor", description="Safety-monitoring sidecar for LLM servers.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "serve",
        help="run the gRPC sidecar with /metrics",
        description="Run the sidecar. Settings: defaults < --config YAML < SAFETY_MONITOR_* env < flags.",
    )
    p.add_argument("--config", help="YAML file of ServerConfig keys (see docs/operations.md)")
    p.add_argument("--host", help="gRPC bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="gRPC port (default 50051; 0 picks a free one)")
    p.add_argument("--metrics-host", help="/metrics bind address (default 127.0.0.1)")
    p.add_argument("--metrics-port", type=int, help="/metrics port (default 9464; 0 picks a free one)")
    p.add_argument("--bundle", help="detector bundle folder (default: the embedded default)")
    p.add_argument("--drift-state", help="file the drift state is saved to and restored from (survives restarts)")
    p.add_argument(
        "--drift-state-strict",
        action="store_const",
        const=True,
        help="refuse to start (exit 2) on a corrupt drift state instead of moving it aside for a fresh reference",
    )
    p.add_argument("--drift-baseline", help="baseline file from `monitor baseline` (used when no state is saved)")
    p.add_argument("--audit-log", help="JSONL file with one record per finished generation")
    p.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC and /metrics over TLS (reloaded on change)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--tls-client-ca", help="PEM CA bundle: require client certificates it signed (mutual TLS)")
    p.add_argument("--critic-url", help="OpenAI-compatible server to critique outputs with (e.g. the reference server)")
    p.add_argument(
        "--critique-mode", choices=["fast", "full"], help="fast: yes/no log-probabilities; full: parsed critique"
    )
    p.add_argument("--constitution", help="YAML file of principles (default: monitor/assets/constitution.yaml)")
    p.add_argument("--debate-url", help="OpenAI-compatible server that debates generations a critical detector flagged")
    p.add_argument(
        "--otlp-endpoint",
        help="http(s)://HOST:PORT of an OTLP/gRPC receiver: verdicts as gen_ai.evaluation.result events (otel extra)",
    )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR")
    p.set_defaults(func=_serve)

    from monitor.sae._config import DEFAULT_CORPUS

    p = sub.add_parser(
        "collect",
        help="collect residual-stream activations of the default model over a chat corpus",
        description="Run SmolLM2-135M-Instruct over chat conversations and store the residual stream at the "
        "given hook points in resumable shards (re-run the same command to resume).",
    )
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a partial run)")
    p.add_argument("--hook-point", action="append", required=True, help="e.g. blocks.16.hook_resid_post (repeatable)")
    p.add_argument("--tokens", type=int, default=1_000_000, help="positions to collect (default 1M)")
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--shard-tokens", type=int, default=131_072)
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    p.add_argument("--corpus", default=str(DEFAULT_CORPUS), help="JSONL(.gz) of {messages: [...]}")
    p.set_defaults(func=_collect)

    p = sub.add_parser(
        "train-sae",
        help="train an SAE on collected activations, analyse its features, evaluate it, write a card",
        description="Train (Adam + L1, unit-norm decoder, grad clip 1.0, warm-up, dead-latent resampling), then "
        "measure FVE / L0 / dead fraction on held-out tokens, the spliced LM-loss increase, and feature reports.",
    )
    p.add_argument("--activations", required=True, help="folder written by `monitor collect`")
    p.add_argument("--out", required=True, help="output folder for the SAE (native format)")
    p.add_argument("--hook-point", default="blocks.16.hook_resid_post")
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--architecture", default="relu", choices=["relu", "jumprelu", "topk"])
    p.add_argument("--k", type=int, help="latents per token (topk)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--l1-coefficient", type=float, default=5.0)
    p.add_argument("--target-l0", type=float, help="steer the L1 weight toward this mean L0 early in training")
    p.add_argument("--eval-tokens", type=int, default=200_000, help="last N collected tokens held out")
    p.add_argument("--lm-eval-conversations", type=int, default=64, help="held-out conversations for the LM loss")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train_sae)

    from monitor import demo

    p = sub.add_parser(
        "train-detectors",
        help="fit the SAE, dense and ensemble detectors into a bundle",
        description="Fit detectors on data/detectors/ (activations cached), calibrate at 1%% FPR, fit the "
        "critical harmful_compliance stack on rows its members never saw and set its threshold on ordinary "
        "traffic (data/ordinary), write detectors.safetensors, the feature reports of the latents used and "
        "bundle.yaml's detectors with their figures (held-out sources and ordinary streams).",
    )
    p.set_defaults(func=_train_detectors)
    p.add_argument("--bundle", help="bundle folder (default: the embedded default)")
    p.add_argument(
        "--behaviour",
        action="append",
        help="deceptive_setup, deceptive_answer, sycophancy, refusal or harmful_request; repeatable (default: all)",
    )
    p.add_argument("--cache", default="runs/detector-acts", help="activation cache folder")

    p = sub.add_parser(
        "evaluate",
        help="re-score a bundle's held-out splits and write the model card",
        description="Score every held-out split through the serving code, write the model card and "
        "exit 1 when an AUROC differs from the bundle's recorded figure by more than --tolerance.",
    )
    p.set_defaults(func=_evaluate)
    p.add_argument("--bundle", help="bundle folder (default: the embedded default)")
    p.add_argument("--cache", default="runs/detector-acts", help="activation cache folder")
    p.add_argument("--card", default="docs/model-card.md", help="where to write the model card")
    p.add_argument("--behaviour", action="append", help="re-measure only these behaviours (repeatable; default all)")
    p.add_argument("--notes", default="docs/model-card-notes.yaml", help="YAML {behaviour: markdown} added to the card")
    p.add_argument("--tolerance", type=float, default=0.01)
    p = sub.add_parser("bundle", help="build a detector bundle for your own model (see docs/your-model.md)")
    bsub = p.add_subparsers(dest="bundle_command", required=True)
    p = bsub.add_parser(
        "build",
        help="from a model to a bundle: answers, labeled data, SAE, detectors, model card",
        description="Build a detector bundle for a model of a supported family (Llama, Mistral, Qwen2/3, Gemma 2/3 "
        "text): check everything that can be checked first (exit 2 with one line), generate the model's own answers "
        "to the prompts that need them, rebuild the labeled sets from them, import or train the SAE, then fit, "
        "calibrate and evaluate the detectors and write bundle.yaml, detectors.safetensors, sae/ and model-card.md "
        "into --out. The FIRST --hook-point gets the full recipe (SAE probes, dense probes, ensembles, the critical "
        "stack); each further one a dense probe per behaviour. Every step resumes from "
        "--work: re-run the same command after an interruption.",
    )
    p.set_defaults(func=_bundle_build)
    p.add_argument("--model", required=True, help="transformers folder, .gguf file, or HF id in the local cache")
    p.add_argument(
        "--hook-point",
        action="append",
        required=True,
        help="blocks.N.hook_resid_post (repeatable; detectors at the first)",
    )
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--work", help="intermediate files, resumed from (default: <out>.work)")
    sae = p.add_mutually_exclusive_group(required=True)
    sae.add_argument("--sae", help="pretrained SAE: native, SAELens, sparsify folder or Gemma Scope params.npz")
    sae.add_argument("--d-sae", type=int, help="train an SAE of this many latents (monitor collect + train-sae)")
    p.add_argument("--sae-tokens", type=int, default=1_000_000, help="positions collected to train it (default 1M)")
    p.add_argument(
        "--sae-architecture",
        default="relu",
        choices=["relu", "jumprelu"],
        help="relu or jumprelu (TopK cannot be sliced for serving)",
    )
    p.add_argument("--sae-steps", type=int, default=3000)
    p.add_argument("--sae-batch-size", type=int, default=4096)
    p.add_argument("--sae-lr", type=float, default=4e-4)
    p.add_argument("--sae-l1-coefficient", type=float, default=5.0)
    p.add_argument("--sae-target-l0", type=float, help="steer the L1 weight toward this mean L0 early in training")
    p.add_argument("--sae-eval-tokens", type=int, default=200_000, help="last N collected positions held out")
    p.add_argument("--sae-lm-eval-conversations", type=int, default=64, help="held-out conversations for the LM loss")
    p.add_argument(
        "--engine",
        default="auto",
        choices=["auto", "hf", "vllm"],
        help="hf, vllm, or auto (default: vllm when its Python exists, else hf in-process)",
    )
    p.add_argument("--vllm-python", help="vLLM's Python (default: $SAFETY_MONITOR_VLLM_PYTHON or .venv-vllm)")
    p.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM engine: GPUs per model")
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="greedy answer length of every prompt set (default: per set, refusal 48, confusable 40, ordinary 32,"
        " the lengths the default bundle's data was made with)",
    )
    p.add_argument("--batch-size", type=int, default=32, help="prompts per HF generate() batch")
    p.add_argument("--limit", type=int, help="at most about N rows per labeled source (smoke runs and tests)")
    p.add_argument("--model-id", help="the model id clients send (default: the HF id, or the folder's name)")
    p.add_argument("--alias", action="append", help="another model id requests may name (repeatable)")
    p.add_argument("--name", help="bundle name (default: <model id>-detectors)")
    p.add_argument("--version", default="0.1.0", help="bundle version")
    p.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="activations and generation"
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda[:N], or auto (device_map=auto over all GPUs)")

    p = sub.add_parser(
        "baseline",
        help="build a drift baseline file from a JSONL of traffic",
        description="Compute the text statistics of every {prompt, output} row and store a reference "
        "sample per statistic, for `monitor serve --drift-baseline`.",
    )
    p.set_defaults(func=_baseline)
    p.add_argument("--traffic", required=True, help='JSONL, one {"prompt": ..., "output": ...} per line')
    p.add_argument("--out", required=True, help="baseline file to write (JSON)")
    p.add_argument("--reference-events", type=int, default=2000, help="reference sample size per statistic")
    p = sub.add_parser("debate", help="debate: adversarial verification (see docs/debate.md)")
    dsub = p.add_subparsers(dest="debate_command", required=True)
    p = dsub.add_parser(
        "experiment",
        help="the honest-vs-deceptive experiment over questions with known answers",
        description="Per trial: a question, roles at random (seeded), the honest agent defends the true answer and "
        "the deceptive one a false one; report the honest win rate, the judge's accuracy with and without debate and "
        "the length baseline, each with a 95%% Wilson interval.",
    )
    p.set_defaults(func=_debate_experiment)
    p.add_argument("--trials", type=int, default=80, help="debates to run (default 80)")
    p.add_argument("--rounds", type=int, default=1, help="argument rounds per debate (default 1)")
    p.add_argument("--max-tokens", type=int, default=40, help="tokens per argument (default 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--questions", help="CSV with Question, Best Answer, Best Incorrect Answer (default: data/debate/)")
    p.add_argument("--out", default="runs/debate/experiment.jsonl", help="JSONL of trials (summary beside it)")
    p.add_argument("--backend-url", help="OpenAI-compatible server (default: the in-process default model)")
    p.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="model name sent to --backend-url")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per backend call")
    demo.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns))
    except MonitorError as exc:
        command = " ".join(c for c in (ns.command, getattr(ns, "bundle_command", None)) if c)
        print(f"monitor {command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
