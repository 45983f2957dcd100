"""The bundle's SAE: a pretrained one imported, or one trained on this model.

Either way it ends up in ``<out>/sae`` in the native format, with its hook point (the bundle's
first) and model id recorded, which is what ``Bundle.load_sae`` and the sidecar read.

- ``import_sae``: any format ``monitor.sae.load`` reads (native, SAELens, sparsify, Gemma Scope
  ``params.npz``). A Gemma Scope file names no hook point; it is given the bundle's first. It
  brings no feature reports, so alerts carry latent ids without labels.
- ``train_sae``: ``monitor collect`` over the chat corpus (resumable shards in ``<work>/sae-acts``)
  and ``monitor train-sae`` (into ``<work>/sae``, with feature reports, the LM-loss evaluation
  and a card), skipped when ``<work>/sae`` already holds an SAE trained with the same settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from monitor.bundling._config import SAETraining
from monitor.sae._config import SAEConfig

__all__ = ["import_sae", "train_sae"]

SETTINGS = "bundle-build.json"  # beside a trained SAE: the settings it was trained with


def import_sae(path: str, hook_point: str, model_id: str, work: Path, out: Path) -> SAEConfig:
    """Load a pretrained SAE, record the hook point and model it serves, save it natively (in
    ``<work>/sae-imported``, then into ``out`` unless ``out`` already holds the same files)."""
    from monitor.sae import load, save

    sae = load(path)
    sae.cfg = dataclasses.replace(sae.cfg, hook_point=sae.cfg.hook_point or hook_point, model_id=model_id)
    staged = work / "sae-imported"
    if staged.exists():
        shutil.rmtree(staged)
    save(sae, staged, extra={"source": {"path": str(path), "imported_by": "monitor bundle build"}})
    _sync(staged, out)
    return sae.cfg


def train_sae(
    training: SAETraining,
    hook_point: str,
    model_id: str,
    work: Path,
    out: Path,
    load_model: Callable[[], tuple[Any, Any]],
    log: Callable[[str], None] = print,
) -> tuple[SAEConfig, bool]:
    """Collect activations and train an SAE on them (both resumable), then copy it into ``out``.

    Returns the SAE's config and whether an SAE trained earlier with the same settings was reused.
    """
    from monitor.sae import load
    from monitor.sae._collect import MANIFEST, CollectConfig, collect
    from monitor.sae._pipeline import SAEBuildConfig, build_sae

    acts, trained = work / "sae-acts", work / "sae"
    settings = {"hook_point": hook_point, "model_id": model_id, **dataclasses.asdict(training)}
    marker = trained / SETTINGS
    reused = marker.is_file() and json.loads(marker.read_text()) == settings and (trained / "sae.json").is_file()
    if reused:
        log(f"sae: trained earlier with the same settings, kept ({trained})")
    else:
        ccfg = CollectConfig(
            hook_points=(hook_point,),
            max_tokens=training.tokens,
            context_size=training.context_size,
            batch_size=training.collect_batch_size,
            model_id=model_id,
        )
        manifest = acts / MANIFEST
        earlier = json.loads(manifest.read_text()) if manifest.is_file() else None
        wanted = {**dataclasses.asdict(ccfg), "hook_points": list(ccfg.hook_points)}
        if earlier is not None and earlier["config"] != wanted:
            log(f"sae: {acts} was collected with other settings; collecting again")
            shutil.rmtree(acts)
            earlier = None
        if earlier is not None and earlier.get("done"):
            log(f"sae: activations collected earlier, kept ({acts})")
        else:
            model, tokenizer = load_model()
            collect(model, tokenizer, ccfg, acts)
        build_sae(
            SAEBuildConfig(
                activations=str(acts),
                out=str(trained),
                hook_point=hook_point,
                d_sae=training.d_sae,
                architecture=training.architecture,
                steps=training.steps,
                batch_size=training.batch_size,
                lr=training.lr,
                l1_coefficient=training.l1_coefficient,
                target_l0=training.target_l0,
                eval_tokens=training.eval_tokens,
                lm_eval_conversations=training.lm_eval_conversations,
                dtype=training.dtype,
                seed=training.seed,
            ),
            load_model=load_model,
        )
        marker.write_text(json.dumps(settings, indent=1) + "\n")
    _sync(trained, out, ignore=(SETTINGS,))
    return load(out).cfg, reused


def _files(folder: Path, ignore: tuple[str, ...]) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in ignore
    }


def _sync(src: Path, dst: Path, ignore: tuple[str, ...] = ()) -> None:
    """Make ``dst`` a copy of ``src``; a ``dst`` that already is one is left untouched (a served
    bundle's files are not rewritten by a resumed build that changed nothing)."""
    if dst.is_dir() and _files(src, ignore) == _files(dst, ()):
        return
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*ignore))


def measure_fit(sae_dir: Path, tokens: list[Any], max_tokens: int = 20_000) -> dict[str, float]:
    """How well the bundle's SAE reconstructs *this model's* residual stream at its hook point.

    ``tokens``: ``[n, d_model]`` arrays of response-token activations (the model's own answers).
    A pretrained SAE made for other weights, another layer or with another input normalisation
    shows up here (low FVE, an L0 far from its card's) before any detector figure is read.
    Returns ``fve`` (fraction of variance explained), ``l0`` (mean active latents), ``dead``
    (fraction of latents never active) and ``tokens`` (how many were measured).
    """
    import numpy as np
    import torch

    from monitor.sae import load

    sae = load(sae_dir)
    x = torch.from_numpy(np.concatenate([np.asarray(t, dtype=np.float32) for t in tokens])[:max_tokens])
    with torch.no_grad():
        z = sae.encode(x)
        err = ((sae.decode(z).float() - x) ** 2).sum()
        var = ((x - x.mean(0)) ** 2).sum()
    return {
        "fve": float(1 - err / var),
        "l0": float((z > 0).sum(1).float().mean()),
        "dead": float(((z > 0).sum(0) == 0).float().mean()),
        "tokens": int(x.shape[0]),
    }
