"""Shared by the tests of the native kernels: load the library or skip, and compare."""

from __future__ import annotations

import pytest
import torch

from recis.ops.native_library import load_native_library


def require_native() -> None:
    """Skip the calling test module when the native library can be neither loaded nor built."""
    try:
        load_native_library()
    except Exception as error:  # no compiler, no headers, ...
        pytest.skip(f"native library unavailable: {error}", allow_module_level=True)


def assert_same(native: torch.Tensor, reference: torch.Tensor, label: str = "") -> None:
    """Equal to float32 rounding: rtol 1e-6 for float32/float64, one rounding of the row dtype otherwise."""
    assert native.dtype == reference.dtype and native.shape == reference.shape, label
    if native.dtype in (torch.bfloat16, torch.float16):
        torch.testing.assert_close(native.float(), reference.float(), rtol=1e-2, atol=1e-3, msg=label)
    elif native.is_floating_point():
        torch.testing.assert_close(native, reference, rtol=1e-6, atol=1e-7, msg=label)
    else:
        assert torch.equal(native, reference), label
