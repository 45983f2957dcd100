import numpy as np
import pytest
import torch

from monitor.errors import InvalidInput
from monitor.tensors import DType, WireTensor, decode, encode, require_finite


@pytest.mark.parametrize("dtype", [DType.F32, DType.F16, DType.BF16])
def test_round_trip_each_dtype(dtype: DType) -> None:
    x = np.random.default_rng(0).normal(size=(5, 7)).astype(np.float32)
    t = encode(x, dtype)
    assert t.shape == (5, 7) and len(t.data) == 35 * dtype.itemsize
    y = decode(t, "t")
    tol = {DType.F32: 0, DType.F16: 1e-3, DType.BF16: 1e-2}[dtype]
    np.testing.assert_allclose(y, x, rtol=tol, atol=tol)


def test_bf16_matches_torch_rounding() -> None:
    x = torch.randn(64, 9, generator=torch.Generator().manual_seed(1))
    ours = decode(encode(x.numpy(), DType.BF16), "t")
    theirs = x.to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours, theirs)


def test_torch_bf16_tensor_is_sent_as_bf16() -> None:
    x = torch.randn(3, 4).to(torch.bfloat16)
    t = encode(x)
    assert t.dtype == DType.BF16
    np.testing.assert_array_equal(decode(t, "t"), x.float().numpy())


def test_unknown_dtype_names_field() -> None:
    with pytest.raises(InvalidInput) as e:
        decode(WireTensor((1, 2), 0, b"\0" * 8), "activations[0].activations")
    assert str(e.value).startswith("activations[0].activations.dtype: expected one of F32, F16, BF16")
    assert e.value.reason == "dtype"


def test_byte_length_mismatch_states_both_sizes() -> None:
    with pytest.raises(InvalidInput) as e:
        decode(WireTensor((2, 3), int(DType.F16), b"\0" * 10), "x")
    assert "x.data: expected 12 bytes" in str(e.value) and "got 10 bytes" in str(e.value)


def test_non_finite_position_reported() -> None:
    a = np.zeros((3, 4), dtype=np.float32)
    a[2, 1] = np.inf
    with pytest.raises(InvalidInput) as e:
        require_finite(a, "x")
    assert "[2, 1]" in str(e.value) and e.value.reason == "non_finite"
