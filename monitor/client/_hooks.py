"""Capture the residual stream of a transformers decoder with forward hooks."""

from __future__ import annotations

import re
from types import TracebackType
from typing import Any

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def layer_of(hook_point: str) -> int:
    """Decoder-layer index of a ``blocks.L.hook_resid_post`` hook point."""
    m = _HOOK.match(hook_point)
    if not m:
        raise ValueError(f"hook_point: expected 'blocks.<layer>.hook_resid_post', got {hook_point!r}")
    return int(m.group(1))


class ResidualCapture:
    """Records the output of chosen decoder layers on every forward pass.

    ``take()`` returns and clears what was captured since the last call: hook point ->
    float32 CPU tensor ``[tokens, d_model]`` (batch 1). Works for Llama-style models whose
    layers live in ``model.model.layers``.
    """

    def __init__(self, model: Any, hook_points: list[str]) -> None:
        layers = model.model.layers
        self._handles: list[Any] = []
        self._buffers: dict[str, list[Any]] = {hp: [] for hp in hook_points}
        for hp in hook_points:
            idx = layer_of(hp)
            if not 0 <= idx < len(layers):
                raise ValueError(f"hook_point {hp!r}: layer {idx} out of range 0..{len(layers) - 1}")
            self._handles.append(layers[idx].register_forward_hook(self._make_hook(hp)))

    def _make_hook(self, hp: str) -> Any:
        def hook(module: Any, inputs: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple) else output
            self._buffers[hp].append(hidden[0].detach().float().cpu())

        return hook

    def take(self) -> dict[str, Any]:
        import torch

        out = {hp: torch.cat(parts) for hp, parts in self._buffers.items() if parts}
        for parts in self._buffers.values():
            parts.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ResidualCapture:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.remove()
