"""Write tiny SAEs with EleutherAI's real ``sparsify`` package (PyPI ``eai-sparsify``) for the format tests.

Each folder under ``tests/data/sparsify/<name>/`` is named like the hook point sparsify trains on
(``layers.3``: the output of decoder layer 3) and holds what ``Sae.save_to_disk`` writes
(``cfg.json`` + ``sae.safetensors``, the layout of EleutherAI's Llama-3 SAEs), plus
``check.safetensors``: an input ``x`` and sparsify's own encode of it, made dense. The encode runs
on the SAE that ``Sae.load_from_disk`` reads back from the folder, so the check covers sparsify's
reading of its own files too; ``encode`` returns the top-k values and indices, scattered here into
a ``[tokens, num_latents]`` array. ``tests/unit/test_sae_formats.py`` loads the folders with this
project's reader and compares.

- ``topk/layers.3``: float32, ``num_latents`` 16, ``k`` 4. The last tokens of ``x`` lie near
  ``b_dec`` and the encoder bias is negative, so some tokens have fewer than ``k`` positive
  pre-activations: sparsify's ReLU-before-top-k detail is exercised.
- ``expansion/layers.3``: ``num_latents`` 0, so the width comes from ``expansion_factor`` 2
  (16 latents); ``multi_topk`` on (a training loss only: ``encode`` ignores it).
- ``bf16/layers.3``: bfloat16 weights, as the published SAEs ship. Its check encode runs the
  loaded SAE in float32 (``.float()``): the bf16 values exactly, without bf16 arithmetic.

``eai-sparsify`` is not a project dependency (it pulls datasets, pandas, pyarrow...), so run this
in a separate environment:

    python -m venv --system-site-packages /tmp/sparsify && /tmp/sparsify/bin/pip install eai-sparsify
    /tmp/sparsify/bin/python scripts/sparsify_fixtures.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sparsify
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "sparsify"
HOOK = "layers.3"
D_IN, NUM_LATENTS, K, TOKENS = 8, 16, 4, 8

FIXTURES: dict[str, dict[str, object]] = {
    "topk": {"cfg": {"num_latents": NUM_LATENTS, "k": K}, "dtype": torch.float32, "bias_shift": -1.0},
    "expansion": {
        "cfg": {"num_latents": 0, "expansion_factor": NUM_LATENTS // D_IN, "k": K, "multi_topk": True},
        "dtype": torch.float32,
        "bias_shift": 0.0,
    },
    "bf16": {"cfg": {"num_latents": NUM_LATENTS, "k": K}, "dtype": torch.bfloat16, "bias_shift": 0.0},
}


def build(spec: dict[str, object]) -> sparsify.Sae:
    cfg = sparsify.SaeConfig(**spec["cfg"])  # type: ignore[arg-type]
    sae = sparsify.Sae(D_IN, cfg, dtype=spec["dtype"])  # type: ignore[arg-type]
    with torch.no_grad():
        for name, p in sae.named_parameters():
            scale = 0.3 if name.endswith("bias") or name == "b_dec" else 1.0
            p.copy_(torch.randn_like(p, dtype=torch.float32) * scale)
        sae.encoder.bias.add_(float(spec["bias_shift"]))  # type: ignore[arg-type]
    return sae


def dense_encode(sae: sparsify.Sae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = sae.encode(x)
    return torch.zeros(x.shape[0], sae.num_latents).scatter(-1, out.top_indices, out.top_acts.float())


def main() -> None:
    torch.manual_seed(0)
    for name, spec in FIXTURES.items():
        folder = OUT / name / HOOK
        shutil.rmtree(OUT / name, ignore_errors=True)
        build(spec).save_to_disk(folder)
        loaded = sparsify.Sae.load_from_disk(folder).float()
        x = torch.randn(TOKENS, D_IN)
        x[-3:] = loaded.b_dec + 0.15 * torch.randn(3, D_IN)  # x - b_dec small: the bias decides
        latents = dense_encode(loaded, x)
        save_file({"x": x.contiguous(), "latents": latents.contiguous()}, str(folder / "check.safetensors"))
        cfg = json.loads((folder / "cfg.json").read_text())
        short = int(((latents > 0).sum(-1) < K).sum())
        print(
            f"{folder}: sparsify {sparsify.__version__}, {cfg}, {int((latents > 0).sum())} active, "
            f"{short} tokens with fewer than k positive"
        )


if __name__ == "__main__":
    main()
