"""``monitor bundle build``: the operator's model in, a detector bundle the sidecar serves out.

The default bundle's recipe, for any supported model, one step after the other, each resumable
from ``<work>``:

1. preflight (``_preflight``): one-line errors before any long job;
2. labeled data that does not depend on the model, copied into ``<work>/data`` (``_data.prepare``);
3. the model's own greedy answers to the prompts that need them (``monitor.answers``: HF in this
   process, or vLLM in its own environment as a subprocess), appended to ``<work>/answers.jsonl``;
4. the three sets built from those answers (``_data.rebuild``);
5. the SAE, imported or trained (``_sae``), into ``<out>/sae``;
6. ``bundle.yaml``'s head (model, hook points, SAE), then ``build_detectors`` fits, calibrates,
   evaluates and writes the detectors (activations cached in ``<work>/acts``), then ``model-card.md``.

The first hook point, the SAE's, gets the full recipe; each later one a dense probe per behaviour
(``build_detectors``), which the sidecar, the clients and the vLLM adapter serve like any other.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from monitor import __version__
from monitor.bundling._config import BuildConfig
from monitor.bundling._data import prepare, rebuild
from monitor.bundling._preflight import BuildError, Preflight, preflight
from monitor.errors import MonitorError

__all__ = ["BuildResult", "build_bundle"]

ANSWERS = "answers.jsonl"
DONE = "bundle-build.json"  # the fingerprint of the inputs the bundle in --out was last built from
PROMPTS = "prompts.jsonl"
CARD = "model-card.md"


@dataclass(frozen=True)
class BuildResult:
    """What a build wrote, and what it skipped because ``work`` already had it."""

    out: Path
    work: Path
    answers_generated: int
    answers_reused: int
    sae: str  # "imported", "trained" or "reused"
    results: dict[str, Any]  # figures per behaviour, detector and split (empty when skipped)
    detectors_skipped: bool = False


class _Model:
    """The model, loaded once, on first use: a fully resumed build never loads it."""

    def __init__(self, source: str, dtype: str, device: str) -> None:
        self.source, self.dtype, self.device = source, dtype, device
        self._loaded: tuple[Any, Any] | None = None

    def __call__(self) -> tuple[Any, Any]:
        if self._loaded is None:
            from monitor.models import load_model

            self._loaded = load_model(self.source, dtype=self.dtype, device=self.device)
        return self._loaded


def build_bundle(cfg: BuildConfig, log: Callable[[str], None] = print) -> BuildResult:
    """Run every step (see the module's docstring); returns what was written and reused."""
    pre = preflight(cfg)
    work, out = cfg.work_dir, Path(cfg.out)
    model_id = cfg.resolved_model_id
    log(
        f"[1/6] preflight: {pre.family.architecture}, {pre.n_layers} layers, d_model {pre.d_model}, hook points "
        f"{', '.join(cfg.hook_points)}; SAE {'from ' + str(cfg.sae) if cfg.sae else 'to train'}; "
        f"answers with {pre.engine}; work in {work}"
    )
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    model = _Model(cfg.model, cfg.dtype, cfg.device)

    log("[2/6] labeled data")
    prompts = prepare(work, cfg.limit, log=log, max_new_tokens=cfg.max_new_tokens)

    log("[3/6] the model's own answers")
    generated, reused = _answers(cfg, pre, prompts, work, model, log)

    log("[4/6] labeled data from this model's answers")
    rebuild(work, work / ANSWERS, prompts, log=log)

    log("[5/6] SAE")
    sae_dir = out / "sae"
    if cfg.sae is not None:
        from monitor.bundling._sae import import_sae

        sae_cfg = import_sae(cfg.sae, cfg.hook_points[0], model_id, work, sae_dir)
        how = "imported"
    else:
        from monitor.bundling._sae import train_sae

        assert cfg.training is not None
        sae_cfg, reused_sae = train_sae(cfg.training, cfg.hook_points[0], model_id, work, sae_dir, model, log=log)
        how = "reused" if reused_sae else "trained"
    log(f"sae: {sae_cfg.architecture}, {sae_cfg.d_sae} latents at {sae_cfg.hook_point} -> {sae_dir}")

    log("[6/6] detectors, calibration, evaluation, model card")
    key = fingerprint(cfg, work / "data", sae_dir)
    if _unchanged(work, out, key):
        log(f"detectors: nothing changed since the last build of {out} (same data, SAE and settings), skipped")
        return BuildResult(out, work, generated, reused, how, {}, detectors_skipped=True)
    write_head(out, cfg, pre)
    from monitor.detectors._evaluate import build_detectors

    results = build_detectors(out, work / "acts", model, log=log, data=work / "data")
    restamp(out, cfg, pre.engine, work / "data")
    fit = _sae_fit(out, work, model)
    log(f"sae on this model's answers: FVE {fit['fve']:.3f}, L0 {fit['l0']:.1f}, dead {fit['dead']:.1%}")
    card = write_card(out, cfg, fit)
    _record(work, out, key)
    log(f"wrote {out}/bundle.yaml, detectors.safetensors, sae/ and {card.name}")
    log(f"serve it with: monitor serve --bundle {out}")
    return BuildResult(out, work, generated, reused, how, results)


def fingerprint(cfg: BuildConfig, data: Path, sae: Path) -> str:
    """What the detectors depend on: the labeled files, the SAE's files and the settings of the bundle."""
    h = hashlib.sha256()
    settings = {
        "model": cfg.model,
        "hook_points": list(cfg.hook_points),
        "dtype": cfg.dtype,
        "model_id": cfg.resolved_model_id,
        "aliases": list(cfg.aliases),
        "name": cfg.bundle_name,
        "version": cfg.version,
        "limit": cfg.limit,
        "monitor": __version__,
    }
    h.update(json.dumps(settings, sort_keys=True).encode())
    for folder in (data, sae):
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(path.relative_to(folder).as_posix().encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def _unchanged(work: Path, out: Path, key: str) -> bool:
    """True when ``out`` is, untouched, what a build with the same ``fingerprint`` wrote."""
    from monitor.detectors._bundle import bundle_identity

    done = work / DONE
    if not done.is_file() or not (out / CARD).is_file() or not (out / "bundle.yaml").is_file():
        return False
    record = json.loads(done.read_text())
    return bool(record.get("fingerprint") == key and record.get("bundle") == bundle_identity(out))


def _record(work: Path, out: Path, key: str) -> None:
    from monitor.detectors._bundle import bundle_identity

    (work / DONE).write_text(json.dumps({"fingerprint": key, "bundle": bundle_identity(out)}, indent=1) + "\n")


def _answers(
    cfg: BuildConfig,
    pre: Preflight,
    prompts: list[dict[str, Any]],
    work: Path,
    model: _Model,
    log: Callable[[str], None],
) -> tuple[int, int]:
    """Generate the answers still missing from ``<work>/answers.jsonl``; (generated, reused)."""
    from monitor.answers import generate_hf, pending

    answers = work / ANSWERS
    todo = pending(prompts, answers)
    reused = len(prompts) - len(todo)
    log(
        f"answers: {reused} of {len(prompts)} already in {answers}; "
        + (f"{len(todo)} to generate with {pre.engine}" if todo else "nothing to generate (skipped)")
    )
    if not todo:
        return 0, reused
    if pre.engine == "hf":
        lm, tokenizer = model()
        generate_hf(lm, tokenizer, todo, answers, batch_size=cfg.generation_batch_size)
        return len(todo), reused
    (work / PROMPTS).write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in todo), encoding="utf-8")
    _run_vllm(cfg, pre, work)
    left = pending(prompts, answers)
    if left:
        raise BuildError(f"answers (vllm): {len(left)} prompts still unanswered in {answers}")
    return len(todo), reused


def _run_vllm(cfg: BuildConfig, pre: Preflight, work: Path) -> None:
    """``<vllm python> -m monitor.answers --engine vllm`` on the pending prompts, in vLLM's own environment."""
    from monitor.harness.vllm import vllm_env
    from monitor.models import DEFAULT_MODEL_ID, default_model_cache, is_converted

    source = cfg.model
    if source == DEFAULT_MODEL_ID:  # the converted folder (vLLM cannot read the package's GGUF as is)
        folder = default_model_cache()
        if not is_converted(folder):
            from monitor.models import load_default_model

            load_default_model()
        source = str(folder)
    assert pre.vllm_python is not None
    cmd = [str(pre.vllm_python), "-m", "monitor.answers", "--engine", "vllm", "--model", source]
    cmd += ["--prompts", str(work / PROMPTS), "--out", str((work / ANSWERS).resolve())]
    cmd += ["--dtype", cfg.dtype]  # each prompt row carries its answer length
    cmd += ["--tensor-parallel-size", str(cfg.tensor_parallel_size)]
    env = vllm_env((work / "vllm").resolve())
    if cfg.device != "cpu":  # a GPU build: keep vLLM's own device defaults, not the CPU ones vllm_env sets
        for key in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_NUM_OF_RESERVED_CPU"):
            env.pop(key, None)
    proc = subprocess.run(cmd, env=env, cwd=str(Path.cwd()), stdout=sys.stderr)
    if proc.returncode != 0:
        raise MonitorError(
            f"answers (vllm): `{' '.join(cmd[:3])} ...` exited with {proc.returncode}; see its output above"
        )


def write_head(out: Path, cfg: BuildConfig, pre: Preflight) -> None:
    """``bundle.yaml`` without detectors: what the sidecar validates against, and where the SAE is.

    ``build_detectors`` then appends the ``detectors:`` section (and keeps this head verbatim).
    """
    head = {
        "format_version": 1,
        "name": cfg.bundle_name,
        "version": cfg.version,
        "model": cfg.resolved_model_id,
    }
    if cfg.aliases:
        head["model_aliases"] = list(cfg.aliases)
    hooks = [
        {"name": hp, "layer": layer, "d_model": pre.d_model}
        for hp, layer in zip(cfg.hook_points, pre.layers, strict=True)
    ]
    lines = [
        f"# Detector bundle for {cfg.resolved_model_id} ({pre.family.architecture}), by `monitor bundle build`.",
        f"# Activations: {cfg.model} loaded in {cfg.dtype}; the full recipe at the first hook point (the SAE's),",
        "# a dense probe per behaviour at each later one.",
        yaml.safe_dump(head, sort_keys=False).rstrip(),
        yaml.safe_dump({"hook_points": hooks}, sort_keys=False).rstrip(),
        "# The SAE the detectors read through (its config records its hook point and source).",
        yaml.safe_dump({"sae": {"path": "sae"}}, sort_keys=False).rstrip(),
    ]
    (out / "bundle.yaml").write_text("\n".join(lines) + "\n")


def restamp(out: Path, cfg: BuildConfig, engine: str, data: Path) -> None:
    """Record in each detector's provenance what *this* build fitted on: the model's weights, the
    labeled data's folder and the command (``build_detectors`` writes the default model's)."""
    from monitor.detectors._evaluate import write_manifest_detectors

    raw = yaml.safe_load((out / "bundle.yaml").read_text()) or {}
    weights = (
        f"{cfg.model} loaded in {cfg.dtype} by monitor.models.load_model; other weights of the model (another "
        "dtype, a quantisation) give slightly different activations: re-measure before relying on the figures"
    )
    answers = f"this model's greedy answers ({engine}, {_lengths(cfg)})"
    for entry in raw.get("detectors") or []:
        prov = entry.setdefault("provenance", {})
        prov["weights"] = weights
        prov["command"] = "monitor bundle build"
        if "data" in prov:
            prov["data"] = str(prov["data"]).replace("data/detectors/", f"{data}/")
        if cfg.limit is not None:
            prov["limit"] = f"at most about {cfg.limit} rows per source (--limit): a smoke build, not a measurement"
    streams = raw.get("ordinary_streams")
    if streams:
        source = str(streams.get("source", ""))
        streams["source"] = source.replace("the default model's greedy answers (vLLM, 32 tokens)", answers)
        streams["command"] = "monitor bundle build"
    write_manifest_detectors(out, raw.get("detectors") or [], raw.get("baselines"), streams)


def _lengths(cfg: BuildConfig) -> str:
    """The answer lengths, as the provenance states them."""
    from monitor.bundling._data import ANSWER_TOKENS

    if cfg.max_new_tokens is not None:
        return f"{cfg.max_new_tokens} tokens"
    return ", ".join(f"{name} {n}" for name, n in ANSWER_TOKENS.items()) + " tokens"


def _sae_fit(out: Path, work: Path, model: _Model) -> dict[str, float]:
    """The SAE's reconstruction of the response tokens of the model's own answers (``refusal.jsonl``
    label 0 and ``ordinary.jsonl``), read from the activation cache ``build_detectors`` filled."""
    from monitor.bundling._sae import measure_fit
    from monitor.detectors._activations import cached_response_activations, response_tokens
    from monitor.detectors._compliance import ORDINARY_FILE

    bundle_hook = yaml.safe_load((out / "bundle.yaml").read_text())["hook_points"][0]["name"]
    tokens = []
    for stem in ("refusal", ORDINARY_FILE):
        rows, acts = cached_response_activations(stem, bundle_hook, work / "acts", model, data=work / "data")
        tokens += [response_tokens(a) for r, a in zip(rows, acts, strict=True) if r.label == 0 or stem != "refusal"]
    return measure_fit(out / "sae", tokens)


def write_card(out: Path, cfg: BuildConfig, fit: dict[str, float] | None = None) -> Path:
    """``<out>/model-card.md`` from the figures ``build_detectors`` recorded in ``bundle.yaml``, with
    the SAE's reconstruction of this model's activations (``fit``) in the preface."""
    from monitor.detectors import Bundle
    from monitor.detectors._card import recorded_results, render_model_card, write_model_card

    bundle = Bundle.load(out)
    text = render_model_card(bundle, recorded_results(bundle), notes={})
    title, _, rest = text.partition("\n")
    preface = (
        f"# Model card: detectors of bundle `{bundle.name}` for `{bundle.model}`\n\n"
        f"Built by `monitor bundle build --model {cfg.model}` from this model's own answers and activations "
        f"(labeled data in `{cfg.work_dir / 'data'}`). The notes below on how to read each figure apply as "
        "written; where they name the default model, read this one."
        + (
            f" **Smoke build** (`--limit {cfg.limit}`): a few rows per source, so the figures say the pipeline ran, "
            "not how well the detectors work."
            if cfg.limit is not None
            else ""
        )
        + "\n"
    )
    if fit is not None:
        preface += (
            f"\nThe SAE on this model's own answers (response tokens of `refusal.jsonl` label 0 and "
            f"`ordinary.jsonl`, {fit['tokens']:,} tokens at `{bundle.hook_points[0].name}`): FVE {fit['fve']:.3f}, "
            f"L0 {fit['l0']:.1f}, dead latents {fit['dead']:.1%}. A pretrained SAE whose FVE here is far below its "
            "own card's was made for other weights, another layer or another input normalisation: its SAE probes "
            "will trail the dense probes.\n"
        )
    path = out / CARD
    write_model_card(path, preface + rest if title.startswith("# ") else preface + text)
    return path
