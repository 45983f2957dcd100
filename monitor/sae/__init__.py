"""Sparse autoencoders: architectures (ReLU, JumpReLU, TopK), file formats, sliced encoding.

Everything the detectors read through; training, activation collection and feature analysis
live beside them in this package. The torch parts load on first use, so reading SAE files into
numpy (``monitor.sae._files``, what serving needs) never imports torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from monitor.sae._config import SAEConfig, SAEError
from monitor.sae._files import EncoderSlice, read, slice_encoder

if TYPE_CHECKING:
    from monitor.sae._base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, register_architecture, sae_class
    from monitor.sae._formats import from_gemma_scope, from_saelens, from_sparsify, load, save, save_saelens
    from monitor.sae._sliced import OnnxSlicedEncoder, SlicedEncoder

_LAZY = {
    "SAE": "_base",
    "JumpReLUSAE": "_base",
    "ReLUSAE": "_base",
    "TopKSAE": "_base",
    "register_architecture": "_base",
    "sae_class": "_base",
    "from_gemma_scope": "_formats",
    "from_saelens": "_formats",
    "from_sparsify": "_formats",
    "load": "_formats",
    "save": "_formats",
    "save_saelens": "_formats",
    "OnnxSlicedEncoder": "_sliced",
    "SlicedEncoder": "_sliced",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"monitor.sae.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'monitor.sae' has no attribute {name!r}")


__all__ = [
    "SAE",
    "EncoderSlice",
    "JumpReLUSAE",
    "OnnxSlicedEncoder",
    "ReLUSAE",
    "SAEConfig",
    "SAEError",
    "SlicedEncoder",
    "TopKSAE",
    "from_gemma_scope",
    "from_saelens",
    "from_sparsify",
    "load",
    "read",
    "register_architecture",
    "sae_class",
    "save",
    "save_saelens",
    "slice_encoder",
]
