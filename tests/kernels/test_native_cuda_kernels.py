"""The CUDA kernels against the torch kernels on CPU (skipped without a CUDA build and GPU).

Nothing here has run yet: no GPU was lent to the work so far (see csrc/README.md). A
session with one runs ``pip install --no-build-isolation -e .`` on a CUDA torch, then
this file.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest
import torch
from id_map_support import find_or_insert
from native_support import assert_same, require_native

from recis.ops import native_kernels
from recis.ops.coalesce import coalesce_rows
from recis.ops.id_map import TorchIdMap
from recis.ops.native_id_map import NativeIdMap
from recis.ops.native_library import has_kernels_for
from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay, sparse_adam_update

require_native()
CUDA = torch.device("cuda")
pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or not has_kernels_for(CUDA), reason="no GPU, or recis built without CUDA"
)
HYPER = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.05, maximize=False)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
RULES = list(itertools.product(WeightDecay, EpsilonPlacement, [False, True]))  # per_row: bias correction "row"


def _tables(rows: int, dim: int, dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(rows, dim, generator=generator).to(dtype)
    exp_avg = torch.randn(rows, dim, generator=generator) * 0.1
    exp_avg_sq = torch.rand(rows, dim, generator=generator) * 0.01
    row_steps = torch.randint(0, 5, (rows, 1), generator=generator)
    return [weight, exp_avg, exp_avg_sq, row_steps]


@pytest.mark.parametrize("dim", [64, 37, 8, 1])  # 16-byte vector loads, and the one-element path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("decay", "epsilon", "per_row"), list(itertools.product(WeightDecay, EpsilonPlacement, [0, 1]))
)
def test_cuda_fused_update_matches_the_torch_kernel(dim, dtype, decay, epsilon, per_row):
    reference = _tables(300, dim, dtype)
    on_gpu = [t.to(CUDA) for t in reference]
    generator = torch.Generator().manual_seed(2)
    for step in range(1, 4):
        rows = torch.randperm(300, generator=generator)[:120]
        grad = torch.randn(120, dim, generator=generator)
        options = dict(HYPER, decay=decay, epsilon=epsilon, step=step)
        sparse_adam_update(*reference[:3], rows, grad, row_steps=reference[3] if per_row else None, **options)
        native_kernels.sparse_adam_update(
            *on_gpu[:3], rows.to(CUDA), grad.to(CUDA), row_steps=on_gpu[3] if per_row else None, **options
        )
    for name, gpu, cpu in zip(("weight", "exp_avg", "exp_avg_sq", "row_steps"), on_gpu, reference):
        assert_same(gpu.cpu(), cpu, f"{name} {dtype} dim {dim}")


@pytest.mark.parametrize("count", [0, 1, 5000])
def test_cuda_coalescing_matches_the_torch_kernel(count):
    generator = torch.Generator().manual_seed(3)
    rows = torch.randint(0, 700, (count,), generator=generator)
    grads = torch.randn(count, 19, generator=generator)
    expected_rows, expected_sums = coalesce_rows(rows, grads)
    got_rows, got_sums = native_kernels.coalesce_rows(rows.to(CUDA), grads.to(CUDA))
    assert torch.equal(got_rows.cpu(), expected_rows)
    assert_same(got_sums.cpu(), expected_sums, "sums")


def test_cuda_id_map_numbers_rows_like_the_cpu_map_with_growth_and_extremes():
    gpu, cpu = NativeIdMap(CUDA), TorchIdMap()
    generator = torch.Generator().manual_seed(4)
    special = torch.tensor([-1, 0, INT64_MIN, INT64_MAX, INT64_MIN + 1, INT64_MAX - 1])
    for size in [0, 7, 3000, 40_000]:
        batch = torch.cat([torch.randint(-20_000, 20_000, (size,), generator=generator), special]).unique()
        batch = batch[torch.randperm(batch.numel(), generator=generator)]
        expected_rows, expected_new = find_or_insert(cpu, batch)
        got_rows, got_new = find_or_insert(gpu, batch.to(CUDA))
        assert torch.equal(got_rows.cpu(), expected_rows) and torch.equal(got_new.cpu(), expected_new)
    assert len(gpu) == len(cpu)
    assert torch.equal(gpu.keys_by_row().cpu(), cpu.keys_by_row())
    probe = torch.randint(-30_000, 30_000, (5000,), generator=generator)
    assert torch.equal(gpu.find(probe.to(CUDA)).cpu(), cpu.find(probe))


def test_a_sparse_step_on_cuda_does_not_synchronize_with_the_host():
    from recis.nn.modules.hashtable import HashTable
    from recis.optim import SparseAdamW

    table = HashTable(16, device=CUDA)
    optimizer = SparseAdamW([table], lr=0.01)
    table(torch.arange(1000, device=CUDA)).square().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_a_row_outside_the_table_stops_the_cuda_update_with_a_device_side_assertion():
    """As torch's CUDA indexing does (the step does not synchronize to check rows first). The
    assertion leaves the process's CUDA context unusable, so a child process provokes it."""
    script = textwrap.dedent(
        """
        import torch
        from recis.ops import native_kernels
        from recis.ops.native_library import load_native_library
        from recis.ops.sparse_adam_update import EpsilonPlacement, WeightDecay

        load_native_library()
        weight, exp_avg, exp_avg_sq = (torch.zeros(32, 8, device="cuda") for _ in range(3))
        rows, grad = torch.tensor([3, 32], device="cuda"), torch.ones(2, 8, device="cuda")
        native_kernels.sparse_adam_update(
            weight, exp_avg, exp_avg_sq, rows, grad, lr=0.01, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
            decay=WeightDecay.DECOUPLED, epsilon=EpsilonPlacement.CORRECTED, maximize=False, step=1,
        )
        torch.cuda.synchronize()
        """
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode != 0
    assert "device-side assert" in child.stdout + child.stderr, child.stderr[-2000:]
