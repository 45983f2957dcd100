"""Validation at the pipeline's boundary: identity fields, text sizes, activation blocks, scores.

Every check raises ``InvalidInput`` naming the field, the expected value and the value received
(INVALID_ARGUMENT on the wire). A block is checked against the bundle before it is decoded, so a
bad shape never costs an allocation.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

from monitor.detectors import Bundle, DetectorResult, DetectorSet, HookPoint
from monitor.errors import InvalidInput
from monitor.pipeline._types import ActivationInput
from monitor.tensors import decode, require_finite

__all__ = [
    "MAX_ABS_ACTIVATION",
    "MAX_LABELS",
    "MAX_LABEL_VALUE",
    "MAX_REQUEST_ID",
    "MAX_TEXT_CHARS",
    "check_identity",
    "check_text",
    "decode_block",
    "finite_results",
]

MAX_REQUEST_ID = 128
MAX_LABELS = 8
MAX_LABEL_VALUE = 128
MAX_TEXT_CHARS = 1_000_000
# Largest |value| accepted in an activation. Residual streams of real models stay below ~1e4;
# bounding the input keeps every sum, norm and score finite in float32.
MAX_ABS_ACTIVATION = 1e6
_LABEL_KEY = re.compile(r"^[a-z_][a-z0-9_]{0,31}$")


def check_identity(request_id: str, model: str, labels: Mapping[str, str], bundle: Bundle) -> None:
    """The request id, the model (the bundle's) and the bounded labels."""
    if not request_id or len(request_id) > MAX_REQUEST_ID:
        raise InvalidInput(
            "request_id", f"1..{MAX_REQUEST_ID} characters", f"{len(request_id)} characters", reason="request_id"
        )
    if model not in bundle.accepted_models:
        raise InvalidInput(
            "model", f"one of {list(bundle.accepted_models)} (the loaded bundle's model)", repr(model), reason="model"
        )
    if len(labels) > MAX_LABELS:
        raise InvalidInput("labels", f"at most {MAX_LABELS} entries", f"{len(labels)} entries", reason="labels")
    for key, value in labels.items():
        if not _LABEL_KEY.match(key):
            raise InvalidInput(
                f"labels[{key[:40]!r}]", "a key matching [a-z_][a-z0-9_]{0,31}", repr(key[:40]), reason="labels"
            )
        if len(value) > MAX_LABEL_VALUE:
            raise InvalidInput(
                f"labels[{key!r}]", f"at most {MAX_LABEL_VALUE} characters", f"{len(value)} characters", reason="labels"
            )


def check_text(name: str, text: str) -> None:
    """A prompt or output within ``MAX_TEXT_CHARS``."""
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidInput(name, f"at most {MAX_TEXT_CHARS} characters", f"{len(text)} characters", reason="text_size")


def decode_block(
    bundle: Bundle, detectors: DetectorSet, block: ActivationInput, field_name: str, max_tokens: int
) -> tuple[HookPoint, np.ndarray]:
    """Check one block against the bundle and ``max_tokens``, then decode it; errors name ``field_name``."""
    hp = bundle.hook_point(block.hook_point)
    if hp is None:
        names = ", ".join(h.name for h in bundle.hook_points)
        raise InvalidInput(
            f"{field_name}.hook_point",
            f"one of [{names}]",
            repr(block.hook_point),
            reason="hook_point",
        )
    width, what = hp.d_model, "d_model"
    if block.projected:
        proj = detectors.projection(hp.name)
        if proj is None:
            raise InvalidInput(
                f"{field_name}.projected",
                f"false (the bundle has no encoder slice for hook point {hp.name})",
                "true",
                reason="projected",
            )
        width, what = proj.width, "projected columns"
    tfield = f"{field_name}.activations"
    shape = block.tensor.shape
    if len(shape) != 2:
        raise InvalidInput(
            f"{tfield}.shape",
            f"rank 2 [tokens, {what}={width}]",
            f"rank {len(shape)} {list(shape)}",
            reason="rank",
        )
    if shape[1] != width:
        raise InvalidInput(
            f"{tfield}.shape[1] ({what})",
            f"{width} for hook point {hp.name}" + (" (the encoder slice's width)" if block.projected else ""),
            str(shape[1]),
            reason="d_model",
        )
    if shape[0] > max_tokens:
        raise InvalidInput(
            f"{tfield}.shape[0] (tokens)",
            f"at most {max_tokens}",
            str(shape[0]),
            reason="too_many_tokens",
        )
    if shape[0] < 1:
        raise InvalidInput(
            f"{tfield}.shape[0] (tokens)",
            "at least 1 token (leave an empty block out)",
            str(shape[0]),
            reason="no_tokens",
        )
    arr = decode(block.tensor, tfield)
    require_finite(arr, tfield, MAX_ABS_ACTIVATION)
    return hp, arr


def finite_results(results: Sequence[DetectorResult]) -> tuple[DetectorResult, ...]:
    """The results, or ``InvalidInput`` when an input drove a score to NaN/Inf (never emitted)."""
    out = tuple(results)
    for r in out:
        if not (math.isfinite(r.score) and math.isfinite(r.probability) and math.isfinite(r.recent_score)):
            raise InvalidInput(
                "activations",
                f"values that give detector {r.name} a finite score",
                f"score {r.score}, probability {r.probability}",
                reason="non_finite",
            )
    return out
