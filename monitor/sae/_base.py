"""The SAE module shared by every architecture, and the registry keyed by architecture name.

Weights follow SAELens's layout: ``W_enc [d_in, d_sae]``, ``b_enc [d_sae]``,
``W_dec [d_sae, d_in]``, ``b_dec [d_in]`` (plus ``threshold [d_sae]`` for JumpReLU).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from monitor.sae._config import SAEConfig, SAEError

_REGISTRY: dict[str, type[SAE]] = {}


def register_architecture(name: str) -> Any:
    """Class decorator: make ``name`` (as stored in configs) build this class. Duplicates raise."""

    def wrap(cls: type[SAE]) -> type[SAE]:
        if name in _REGISTRY:
            raise SAEError(f"architecture {name!r} registered twice ({_REGISTRY[name].__name__}, {cls.__name__})")
        cls.architecture = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def sae_class(name: str) -> type[SAE]:
    """The class registered for architecture ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise SAEError(f"architecture: expected one of {sorted(_REGISTRY)}, got {name!r}") from None


class SAE(nn.Module):
    """A sparse autoencoder; subclasses define only ``activation`` (pre-activations -> latents)."""

    architecture: ClassVar[str] = ""
    extra_params: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            raise SAEError(
                f"architecture: {type(self).__name__} expects {self.architecture!r}, got {cfg.architecture!r}"
            )
        self.cfg = cfg
        self.W_enc = nn.Parameter(torch.zeros(cfg.d_in, cfg.d_sae))
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(torch.zeros(cfg.d_sae, cfg.d_in))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # -- the computation ----------------------------------------------------------------------
    @property
    def input_scale(self) -> float:
        """Factor applied to inputs before encoding (1.0 unless expected_average_only_in)."""
        if self.cfg.normalize_activations == "expected_average_only_in" and self.cfg.norm_scaling_factor:
            return float(self.cfg.norm_scaling_factor)
        return 1.0

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations ``[..., d_sae]``."""
        x = x.to(self.W_enc.dtype) * self.input_scale
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations ``[..., d_sae]`` of activations ``[..., d_in]``."""
        return self.activation(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[..., d_in]`` in the input's own scale."""
        return (z @ self.W_dec + self.b_dec) / self.input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # -- maintenance ---------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (the training constraint applied after each step)."""
        norms = self.W_dec.norm(dim=1).clamp_min(1e-8)
        self.W_dec.div_(norms[:, None])

    @torch.no_grad()
    def fold_input_scale(self) -> SAE:
        """Fold ``norm_scaling_factor`` into the weights so the SAE reads raw activations."""
        s = self.input_scale
        if s == 1.0:
            return self
        self.W_enc.mul_(s)
        self.W_dec.div_(s)
        self.b_dec.div_(s)
        self._fold_extra(s)
        self.cfg = SAEConfig.from_dict({**self.cfg.to_dict(), "normalize_activations": "none"})
        return self

    def _fold_extra(self, s: float) -> None:
        """Hook for architectures with parameters in pre-activation units (none by default)."""

    def state(self) -> dict[str, torch.Tensor]:
        """The weights by SAELens name."""
        names = ("W_enc", "b_enc", "W_dec", "b_dec", *self.extra_params)
        return {n: getattr(self, n).detach() for n in names}

    @classmethod
    def from_state(cls, cfg: SAEConfig, state: dict[str, torch.Tensor]) -> SAE:
        """Build an SAE of ``cfg.architecture`` from named weights, checking every shape."""
        sae = sae_class(cfg.architecture)(cfg)
        for name, param in sae.named_parameters():
            if name not in state:
                raise SAEError(f"weights: missing tensor {name!r} for a {cfg.architecture} SAE")
            t = torch.as_tensor(state[name])
            if tuple(t.shape) != tuple(param.shape):
                raise SAEError(f"weights[{name!r}]: expected shape {list(param.shape)}, got {list(t.shape)}")
            param.data = t.detach().to(torch.float32).clone()
        return sae.eval().requires_grad_(False)


@register_architecture("relu")
class ReLUSAE(SAE):
    """Standard SAE: ``relu(pre)``; latents are independent, so a sliced encode is exact."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)


@register_architecture("jumprelu")
class JumpReLUSAE(SAE):
    """JumpReLU: a latent is ``pre`` where ``pre > threshold`` (per latent), else 0."""

    extra_params = ("threshold",)

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.where(pre > self.threshold, torch.relu(pre), torch.zeros_like(pre))

    def _fold_extra(self, s: float) -> None:
        pass  # W_enc and b_dec scale together, so pre-activations (and thresholds) keep their units


@register_architecture("topk")
class TopKSAE(SAE):
    """TopK: keep the k largest pre-activations per token (after ReLU). Needs the full encode."""

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        k = int(self.cfg.k or 1)
        vals, idx = pre.topk(k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, idx, torch.relu(vals))
