"""The inputs of one ``monitor bundle build`` run (no heavy imports: the CLI builds it first)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BuildConfig", "SAETraining"]


@dataclass(frozen=True)
class SAETraining:
    """How to train the bundle's SAE when none is given (``monitor collect`` + ``monitor train-sae``).

    tokens: residual-stream positions collected from the chat corpus (the last ``eval_tokens`` are
    held out for the SAE's figures). The rest are ``monitor train-sae``'s options.
    """

    d_sae: int
    tokens: int = 1_000_000
    architecture: str = "relu"
    steps: int = 3000
    batch_size: int = 4096
    lr: float = 4e-4
    l1_coefficient: float = 5.0
    target_l0: float | None = None
    eval_tokens: int = 200_000
    lm_eval_conversations: int = 64
    context_size: int = 256
    collect_batch_size: int = 16
    dtype: str = "float16"
    seed: int = 0


@dataclass(frozen=True)
class BuildConfig:
    """One build: the model, where to read it, the SAE, how answers are generated, where files go.

    model: a transformers folder, a ``.gguf`` file or a Hugging Face id in the local cache.
    hook_points: ``blocks.L.hook_resid_post``; the full recipe at the first (the SAE's), a dense
        probe per behaviour at each of the others.
    out: the bundle folder written; work: resumable intermediate files (default ``<out>.work``).
    sae: a pretrained SAE (native, SAELens, sparsify folder or Gemma Scope ``params.npz``), or
    training: how to train one. Exactly one of the two.
    max_new_tokens: the greedy answer length of every prompt set; ``None``: each set's length in
        ``_data.ANSWER_TOKENS`` (refusal 48, confusable 40, ordinary 32, as the default data was made).
    engine: ``auto`` (vLLM when ``vllm_python`` or ``.venv-vllm/bin/python`` exists), ``hf`` or ``vllm``.
    limit: at most about this many rows per labeled source (whole prompt groups): smoke runs and tests.
    model_id: what clients name the model (default: the HF id, or the folder's / file's name).
    dtype, device: how the model is loaded for the teacher-forced activations (and HF generation).
    """

    model: str
    hook_points: tuple[str, ...]
    out: Path
    work: Path | None = None
    sae: str | None = None
    training: SAETraining | None = None
    engine: str = "auto"
    vllm_python: str | None = None
    tensor_parallel_size: int = 1
    max_new_tokens: int | None = None
    generation_batch_size: int = 32
    limit: int | None = None
    model_id: str | None = None
    aliases: tuple[str, ...] = ()
    name: str | None = None
    version: str = "0.1.0"
    dtype: str = "float32"
    device: str = "cpu"

    @property
    def work_dir(self) -> Path:
        """Where intermediate files live (resumed from on the next run with the same folder)."""
        return Path(self.work) if self.work is not None else Path(f"{self.out}.work")

    @property
    def resolved_model_id(self) -> str:
        """The model id the bundle declares: ``model_id``, else the HF id, else the folder's or file's name."""
        if self.model_id:
            return self.model_id
        path = Path(self.model).expanduser()
        if path.exists() or self.model.startswith((".", "/", "~")):
            return path.stem if path.suffix == ".gguf" else path.resolve().name
        return self.model

    @property
    def bundle_name(self) -> str:
        """``name``, else ``<model id, lower case, slashes and odd characters as dashes>-detectors``."""
        if self.name:
            return self.name
        slug = re.sub(r"[^a-z0-9.]+", "-", self.resolved_model_id.lower()).strip("-")
        return f"{slug}-detectors"
