"""Wire tensors <-> numpy arrays: dtypes (f32, f16, bf16), shapes and finiteness checks.

Decoding is where untrusted bytes become arrays, so every check names the field it failed on.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitor.errors import InvalidInput

__all__ = ["DType", "WireTensor", "decode", "encode", "require_finite"]


class DType(enum.IntEnum):
    """Element types on the wire; values match ``safety_monitor.v1.DType``."""

    F32 = 1
    F16 = 2
    BF16 = 3

    @property
    def itemsize(self) -> int:
        return 4 if self is DType.F32 else 2


_NAMES = "F32, F16, BF16"


@dataclass(frozen=True)
class WireTensor:
    """A tensor as it travels: shape, dtype code and raw little-endian bytes."""

    shape: tuple[int, ...]
    dtype: int
    data: bytes


def decode(t: WireTensor, field: str) -> np.ndarray:
    """Check a wire tensor and return it as a float32 array of its shape.

    Raises ``InvalidInput`` naming ``field`` when the dtype is unknown, a dimension is negative
    or the byte length disagrees with shape x itemsize.
    """
    try:
        dtype = DType(t.dtype)
    except ValueError:
        raise InvalidInput(f"{field}.dtype", f"one of {_NAMES}", _dtype_name(t.dtype), reason="dtype") from None
    if any(d < 0 for d in t.shape):
        raise InvalidInput(f"{field}.shape", "non-negative dimensions", str(list(t.shape)), reason="shape")
    count = math.prod(t.shape)
    want = count * dtype.itemsize
    if len(t.data) != want:
        raise InvalidInput(
            f"{field}.data",
            f"{want} bytes (shape {list(t.shape)} x {dtype.itemsize} bytes for {dtype.name})",
            f"{len(t.data)} bytes",
            reason="byte_length",
        )
    if dtype is DType.F32:
        arr = np.frombuffer(t.data, dtype="<f4").astype(np.float32, copy=False)
    elif dtype is DType.F16:
        arr = np.frombuffer(t.data, dtype="<f2").astype(np.float32)
    else:
        half = np.frombuffer(t.data, dtype="<u2").astype(np.uint32)
        arr = (half << 16).view(np.float32)
    return arr.reshape(t.shape)


def require_finite(arr: np.ndarray, field: str, max_abs: float = math.inf) -> None:
    """Raise ``InvalidInput`` naming the first NaN/Inf position of ``arr`` (or the first value
    whose magnitude exceeds ``max_abs``).

    The common case (all fine) costs one min and one max pass without temporaries: NaN
    propagates through both, so only a failing array pays for locating the culprit.
    """
    if not arr.size:
        return
    lo, hi = float(arr.min()), float(arr.max())
    if math.isfinite(lo) and math.isfinite(hi) and max(-lo, hi) <= max_abs:
        return
    finite = np.isfinite(arr)
    if not finite.all():
        pos = tuple(int(i) for i in np.argwhere(~finite)[0])
        raise InvalidInput(
            f"{field}.data",
            "finite values",
            f"{float(arr[pos])} at index {list(pos)} ({int((~finite).sum())} non-finite values)",
            reason="non_finite",
        )
    pos = tuple(int(i) for i in np.argwhere(np.abs(arr) > max_abs)[0])
    raise InvalidInput(
        f"{field}.data",
        f"values with |x| <= {max_abs:g}",
        f"{float(arr[pos]):g} at index {list(pos)}",
        reason="out_of_range",
    )


def encode(arr: Any, dtype: DType | None = None) -> WireTensor:
    """Encode a numpy array (or a torch tensor, on CPU or not) as a wire tensor.

    ``dtype`` defaults to the array's own (f32, f16; bf16 for torch bfloat16); other float
    arrays are sent as f32.
    """
    if _is_torch(arr):
        arr, native = _torch_to_numpy(arr)
        if dtype is None:
            dtype = native
    a = np.asarray(arr)
    if dtype is None:
        dtype = DType.F16 if a.dtype == np.float16 else DType.F32
    shape = tuple(int(d) for d in a.shape)
    if dtype is DType.F32:
        data = np.ascontiguousarray(a, dtype="<f4").tobytes()
    elif dtype is DType.F16:
        data = np.ascontiguousarray(a, dtype="<f2").tobytes()
    elif a.dtype == np.uint16:  # already bf16 bit patterns
        data = np.ascontiguousarray(a, dtype="<u2").tobytes()
    else:
        data = _f32_to_bf16_bits(np.asarray(a, dtype=np.float32)).astype("<u2").tobytes()
    return WireTensor(shape=shape, dtype=int(dtype), data=data)


def _f32_to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (NaN kept as NaN)."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def _is_torch(x: Any) -> bool:
    return type(x).__module__.split(".")[0] == "torch"


def _torch_to_numpy(t: Any) -> tuple[np.ndarray, DType]:
    import torch  # only reached when the caller already uses torch

    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.contiguous().view(torch.int16).cpu().numpy().view(np.uint16), DType.BF16
    if t.dtype == torch.float16:
        return t.cpu().numpy(), DType.F16
    return t.float().cpu().numpy(), DType.F32


def _dtype_name(code: int) -> str:
    return "DTYPE_UNSPECIFIED (0)" if code == 0 else f"unknown dtype code {code}"
