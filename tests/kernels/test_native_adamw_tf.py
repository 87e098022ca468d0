"""The native multi-tensor AdamWTF kernel against torch's _foreach path."""

from __future__ import annotations

import pytest
import torch
from native_support import assert_same, require_native

from recis.ops import adamw_tf_update, native_kernels

require_native()


def _state(dtype: torch.dtype, seed: int):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (16384 + 5,), (64, 64), (1,), (7, 9, 2)]  # more than one chunk, odd tails
    params = [torch.randn(shape, generator=generator).to(dtype) for shape in shapes]
    exp_avgs = [torch.randn(shape, generator=generator).to(dtype) * 0.1 for shape in shapes]
    exp_avg_sqs = [torch.rand(shape, generator=generator).to(dtype) * 0.01 for shape in shapes]
    steps = [torch.tensor(float(i)) for i in range(len(shapes))]  # tensors at different steps
    return params, exp_avgs, exp_avg_sqs, steps


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("maximize", [False, True])
def test_native_multi_tensor_step_matches_foreach(dtype, maximize):
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, maximize=maximize)
    native, reference = _state(dtype, seed=1), _state(dtype, seed=1)
    generator = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in native[0]]
        native_kernels.adamw_tf_multi_tensor(native[0], grads, *native[1:], **hyper)
        adamw_tf_update.adamw_tf_multi_tensor(reference[0], grads, *reference[1:], **hyper)
    for native_list, reference_list in zip(native, reference):
        for a, b in zip(native_list, reference_list):
            assert not a.isnan().any()
            assert_same(a, b)
            if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
                assert torch.equal(a, b)  # the same fused multiply-adds and sqrt as torch's kernels


def test_non_contiguous_tensors_are_updated_through_contiguous_copies():
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, maximize=False)
    base, grad = torch.randn(6, 4), torch.randn(4, 6)
    native = [base.clone().t()], [torch.zeros(6, 4).t()], [torch.zeros(6, 4).t()], [torch.tensor(0.0)]
    reference = [base.t().contiguous()], [torch.zeros(4, 6)], [torch.zeros(4, 6)], [torch.tensor(0.0)]
    assert not native[0][0].is_contiguous() and not native[1][0].is_contiguous()
    for _ in range(2):
        native_kernels.adamw_tf_multi_tensor(native[0], [grad], *native[1:], **hyper)
        adamw_tf_update.adamw_tf_multi_tensor(reference[0], [grad], *reference[1:], **hyper)
    for native_list, reference_list in zip(native, reference):
        assert_same(native_list[0], reference_list[0])
    assert not native[0][0].is_contiguous() and float(native[3][0]) == 2.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_tensors_equal_float32_math_rounded_once_per_step(dtype):
    # Each step: widen to float32, the float32 update, round back (torch's _foreach path
    # would round after every operation instead).
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.02, maximize=False)
    native = [[t.to(dtype) for t in tensors] for tensors in _state(torch.float32, seed=3)[:3]]
    native.append([torch.tensor(float(i)) for i in range(len(native[0]))])
    reference = [[t.clone() for t in tensors] for tensors in native]
    generator = torch.Generator().manual_seed(4)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in native[0]]
        native_kernels.adamw_tf_multi_tensor(native[0], grads, *native[1:], **hyper)
        wide = [[t.float() for t in tensors] for tensors in reference[:3]]
        adamw_tf_update.adamw_tf_multi_tensor(wide[0], [g.float() for g in grads], *wide[1:], reference[3], **hyper)
        for narrow_list, wide_list in zip(reference[:3], wide):
            for narrow, value in zip(narrow_list, wide_list):
                narrow.copy_(value)
    for native_list, reference_list in zip(native, reference):
        for a, b in zip(native_list, reference_list):
            assert_same(a, b)
            if torch.backends.cpu.get_cpu_capability().startswith("AVX"):
                assert torch.equal(a, b)
