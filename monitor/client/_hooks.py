"""Hook-point names of a transformers decoder's residual stream (``blocks.L.hook_resid_post``)."""

from __future__ import annotations

import re

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_post$")


def layer_of(hook_point: str) -> int:
    """Decoder-layer index of a ``blocks.L.hook_resid_post`` hook point."""
    m = _HOOK.match(hook_point)
    if not m:
        raise ValueError(f"hook_point: expected 'blocks.<layer>.hook_resid_post', got {hook_point!r}")
    return int(m.group(1))
