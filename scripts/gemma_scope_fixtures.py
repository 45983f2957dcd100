"""Write a tiny Gemma Scope ``params.npz`` and the real ``sae-lens``'s encode of it, for the format tests.

``tests/data/gemma_scope/`` gets ``params.npz`` (``W_enc [8, 16]``, ``W_dec [16, 8]``, ``b_enc``,
``b_dec``, ``threshold``: random, thresholds positive, the array names of Google DeepMind's
release) and ``check.safetensors``: an input ``x`` and SAELens's own ``encode(x)``.

SAELens reads Gemma Scope with ``gemma_2_sae_huggingface_loader`` (``sae_lens/loading/
pretrained_sae_loaders.py``): it builds the config from the hub repo id and folder name, downloads
``params.npz`` with ``hf_hub_download``, and turns the arrays into its state dict. Here that very
function runs on the local file: only ``hf_hub_download`` is replaced (by one returning the local
path), and the widths the repo id implies (Gemma 2 2B: d_in 2304, width_16k) are overridden to the
tiny ones through the loader's own ``cfg_overrides``. ``SAE.load_from_disk`` with that loader as
its ``converter`` then applies SAELens's config defaults and builds its ``JumpReLUSAE``, whose
``encode`` gives the expected latents. ``tests/unit/test_sae_formats.py`` loads ``params.npz``
with this project's reader and compares.

``sae-lens`` is not a project dependency, so run this in a separate environment (the one
``scripts/saelens_fixtures.py`` uses):

    python -m venv --system-site-packages /tmp/saelens && /tmp/saelens/bin/pip install sae-lens
    /tmp/saelens/bin/python scripts/gemma_scope_fixtures.py
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import sae_lens
import torch
from sae_lens.loading import pretrained_sae_loaders
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "gemma_scope"
D_IN, D_SAE, TOKENS = 8, 16, 6
# A real Gemma Scope location: the loader derives model and hook point from it.
REPO_ID, FOLDER = "google/gemma-scope-2b-pt-res", "layer_3/width_16k/average_l0_50"


def write_params(path: Path, rng: np.random.Generator) -> None:
    arrays = {
        "W_enc": rng.normal(size=(D_IN, D_SAE)),
        "W_dec": rng.normal(size=(D_SAE, D_IN)),
        "b_enc": rng.normal(size=D_SAE) * 0.3,
        "b_dec": rng.normal(size=D_IN) * 0.3,
        "threshold": rng.uniform(0.2, 1.5, size=D_SAE),
    }
    np.savez(path, **{k: v.astype(np.float32) for k, v in arrays.items()})


def saelens_gemma_scope(npz: Path) -> sae_lens.SAE[Any]:
    """SAELens's Gemma 2 (Gemma Scope) loader, run on a local ``params.npz`` instead of the hub."""

    def local_download(repo_id: str, filename: str, subfolder: str = "", **_: Any) -> str:
        assert (repo_id, subfolder, filename) == (REPO_ID, FOLDER, "params.npz"), (repo_id, subfolder, filename)
        return str(npz)

    def converter(path: Any, device: str, cfg_overrides: dict[str, Any] | None = None) -> tuple[dict, dict]:
        overrides = {"d_in": D_IN, "d_sae": D_SAE, **(cfg_overrides or {})}
        with mock.patch.object(pretrained_sae_loaders, "hf_hub_download", local_download):
            cfg, state, _ = pretrained_sae_loaders.gemma_2_sae_huggingface_loader(
                REPO_ID, FOLDER, device=device, cfg_overrides=overrides
            )
        return cfg, state

    return sae_lens.SAE.load_from_disk(npz.parent, converter=converter)


def main() -> None:
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)
    write_params(OUT / "params.npz", np.random.default_rng(0))
    sae = saelens_gemma_scope(OUT / "params.npz")
    assert type(sae).__name__ == "JumpReLUSAE" and not sae.cfg.apply_b_dec_to_input, sae.cfg
    x = torch.randn(TOKENS, D_IN)
    with torch.no_grad():
        latents = sae.encode(x)
    save_file({"x": x.contiguous(), "latents": latents.contiguous()}, str(OUT / "check.safetensors"))
    print(
        f"{OUT}: sae-lens {sae_lens.__version__}, {type(sae).__name__}, hook {sae.cfg.metadata.hook_name}, "
        f"{int((latents > 0).sum())} of {latents.numel()} active"
    )


if __name__ == "__main__":
    main()
