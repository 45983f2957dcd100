"""Write tiny SAEs with the real ``sae-lens`` package, one per architecture, for the format tests.

The files under ``tests/data/saelens/`` are what SAELens itself writes (``save_model``: SAELens 6
nests ``hook_name`` / ``model_name`` under ``metadata``), plus ``check.safetensors``: an input
``x`` and SAELens's own ``encode(x)``. ``tests/unit/test_sae_formats.py`` loads them with this
project's reader and compares. ``sae-lens`` is not a project dependency (it pulls ~50 packages,
548 MB, measured 53 s to install), so run this in a separate environment:

    python -m venv --system-site-packages /tmp/saelens && /tmp/saelens/bin/pip install sae-lens
    /tmp/saelens/bin/python scripts/saelens_fixtures.py
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import sae_lens
import torch
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "saelens"
D_IN, D_SAE, TOKENS = 8, 16, 6
METADATA = {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny-model"}


def build(arch: str) -> torch.nn.Module:
    common = {"d_in": D_IN, "d_sae": D_SAE}
    if arch == "standard":
        sae = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(**common))
    elif arch == "jumprelu":  # Gemma Scope's convention: b_dec is not subtracted from the input
        sae = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(**common, apply_b_dec_to_input=False))
    else:
        sae = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(**common, k=4))
    for key, value in METADATA.items():
        setattr(sae.cfg.metadata, key, value)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if name.startswith("b") else 1.0))
            if name == "threshold":
                p.copy_(torch.rand_like(p) * 0.5)
    return sae


def main() -> None:
    torch.manual_seed(0)
    for arch in ("standard", "jumprelu", "topk"):
        folder = OUT / arch
        shutil.rmtree(folder, ignore_errors=True)
        sae = build(arch)
        sae.save_model(folder)
        x = torch.randn(TOKENS, D_IN)
        with torch.no_grad():
            latents = sae.encode(x)
        save_file({"x": x.contiguous(), "latents": latents.contiguous()}, str(folder / "check.safetensors"))
        cfg = json.loads((folder / "cfg.json").read_text())
        print(f"{folder}: {cfg['architecture']}, sae-lens {sae_lens.__version__}, {int((latents > 0).sum())} active")


if __name__ == "__main__":
    main()
