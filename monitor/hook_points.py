"""Hook points of a decoder's residual stream, shared by the client, the sidecar and the adapters.

Names follow SAELens/TransformerLens: ``blocks.L.hook_resid_post`` is the output of decoder layer
L (``hidden_states[L + 1]`` in transformers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["HookStats", "layer_of"]

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def layer_of(hook_point: str) -> int:
    """Decoder-layer index of a ``blocks.L.hook_resid_post`` hook point."""
    m = _HOOK.match(hook_point)
    if not m:
        raise ValueError(f"hook_point: expected 'blocks.<layer>.hook_resid_post', got {hook_point!r}")
    return int(m.group(1))


@dataclass(frozen=True)
class HookStats:
    """Real statistics of the activations seen at one hook point."""

    hook_point: str
    tokens: int
    mean_l2_norm: float
    max_l2_norm: float
