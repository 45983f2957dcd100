"""Sparse autoencoders: architectures (ReLU, JumpReLU, TopK), file formats, sliced encoding.

Everything the detectors read through; training, activation collection and feature analysis
live beside them in this package.
"""

from monitor.sae._base import SAE, JumpReLUSAE, ReLUSAE, TopKSAE, register_architecture, sae_class
from monitor.sae._config import SAEConfig, SAEError
from monitor.sae._formats import from_gemma_scope, from_saelens, load, save, save_saelens
from monitor.sae._sliced import OnnxSlicedEncoder, SlicedEncoder

__all__ = [
    "SAE",
    "JumpReLUSAE",
    "OnnxSlicedEncoder",
    "ReLUSAE",
    "SAEConfig",
    "SAEError",
    "SlicedEncoder",
    "TopKSAE",
    "from_gemma_scope",
    "from_saelens",
    "load",
    "register_architecture",
    "sae_class",
    "save",
    "save_saelens",
]
