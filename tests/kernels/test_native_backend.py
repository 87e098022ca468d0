"""The backend switch (recis/ops/backend.py): RECIS_BACKEND and use_backend choose the kernels
at call time; native is native or an error; auto falls back only with one warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from native_support import require_native
from torch.autograd import forward_ad

from recis.ops import IdMap, backend, choose_backend, coalesce_rows, gather_rows, native_kernels, use_backend
from recis.ops.id_map import TorchIdMap
from recis.ops.native_id_map import NativeIdMap

require_native()


@pytest.fixture
def broken_native(monkeypatch):
    """The native library fails to load, as without a compiler (a fresh cache of native_problem)."""

    def broken() -> None:
        raise OSError("no compiler here\nsecond line")

    monkeypatch.setattr(backend, "load_native_library", broken)
    backend.native_problem.cache_clear()
    monkeypatch.setattr(backend, "_announced", set())
    yield
    backend.native_problem.cache_clear()


def test_the_environment_chooses_in_a_fresh_process():
    code = "import recis.ops; print(recis.ops.choose_backend(), type(recis.ops.IdMap()).__name__)"
    for value, expected in (("torch", "torch TorchIdMap"), ("", "native NativeIdMap")):
        env = {**os.environ, "RECIS_BACKEND": value}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split() == expected.split()


def test_an_unknown_backend_is_an_error(monkeypatch):
    monkeypatch.setenv("RECIS_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="RECIS_BACKEND must be one of"):
        IdMap()
    with pytest.raises(ValueError, match="use_backend must be one of"), use_backend("fast"):
        pass


def test_use_backend_switches_the_kernels_at_call_time_and_nests(monkeypatch):
    monkeypatch.setenv("RECIS_BACKEND", "native")
    assert isinstance(IdMap(), NativeIdMap)
    with use_backend("torch"):
        assert choose_backend() == "torch" and isinstance(IdMap(), TorchIdMap)
        with use_backend("native"):
            assert isinstance(IdMap(), NativeIdMap)
        assert isinstance(IdMap(), TorchIdMap)
    assert choose_backend() == "native"


def test_auto_falls_back_to_torch_with_one_one_line_warning(monkeypatch, broken_native):
    monkeypatch.setenv("RECIS_BACKEND", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert isinstance(IdMap(), TorchIdMap)
        rows, sums = coalesce_rows(torch.tensor([1, 1]), torch.ones(2, 3))
    assert rows.tolist() == [1] and sums.tolist() == [[2.0] * 3]
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "no compiler here" in str(caught[0].message)


def test_native_refuses_to_fall_back(monkeypatch, broken_native):
    monkeypatch.setenv("RECIS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="RECIS_BACKEND=native but .*no compiler here.*RECIS_BACKEND=torch"):
        coalesce_rows(torch.tensor([1, 1]), torch.ones(2, 3))


def test_a_device_without_native_kernels_is_an_error_under_native_and_announced_under_auto(monkeypatch):
    if backend.native_problem("cuda") is None:
        pytest.skip("this native library has CUDA kernels")
    monkeypatch.setattr(backend, "_announced", set())
    with use_backend("native"), pytest.raises(RuntimeError, match="no cuda kernels"):
        choose_backend("cuda")
    with use_backend("auto"), pytest.warns(UserWarning, match="using the torch kernels for cuda tensors"):
        assert choose_backend("cuda") == "torch"


def test_adamw_tf_on_cuda_is_routed_to_torch_on_purpose_and_announced(monkeypatch):
    monkeypatch.setattr(backend, "native_problem", lambda device_type: None)
    monkeypatch.setattr(backend, "_announced", set())
    with use_backend("native"), pytest.warns(UserWarning, match="adamw_tf_multi_tensor on cuda runs torch's kernels"):
        assert choose_backend("cuda", "adamw_tf_multi_tensor") == "torch"
    with use_backend("native"):
        assert choose_backend("cuda", "sparse_adam_update") == "native"


@pytest.fixture
def native_gathers(monkeypatch) -> list[int]:
    """Counts the native gather_rows calls (each appends its index length)."""
    calls: list[int] = []
    native_gather = native_kernels.gather_rows

    def counted(rows, index):
        calls.append(index.numel())
        return native_gather(rows, index)

    monkeypatch.setattr(native_kernels, "gather_rows", counted)
    return calls


class _TableSubclass(torch.Tensor):
    pass


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's make_dual
def test_one_table_is_gathered_natively_unless_autograd_tracks_it(native_gathers):
    table = torch.randn(50, 6, generator=torch.Generator().manual_seed(0))
    index = torch.tensor([3, 49, 0, 3])
    with use_backend("native"):
        assert torch.equal(gather_rows(table, index), table.index_select(0, index))
        assert native_gathers == [4]
        tracked = table.clone().requires_grad_()
        gather_rows(tracked, index).sum().backward()  # torch's differentiable gather
        assert native_gathers == [4]
        assert torch.equal(tracked.grad[3], torch.full((6,), 2.0)) and tracked.grad[1].abs().sum() == 0
        with torch.no_grad():
            gather_rows(tracked, index)
        assert native_gathers == [4, 4]
        assert torch.equal(gather_rows(torch.arange(10), index[index < 10]), torch.tensor([3, 0, 3]))  # 1-D: torch
        assert torch.equal(gather_rows(table.t(), torch.tensor([1])), table.t()[1:2])  # not contiguous: torch
        assert torch.equal(gather_rows(table, index.int()), table[index])  # int32 index: torch
        subclassed = gather_rows(table.as_subclass(_TableSubclass), index)  # torch keeps the subclass
        assert type(subclassed) is _TableSubclass and torch.equal(subclassed, table[index])
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(table, torch.ones_like(table))
            assert torch.equal(forward_ad.unpack_dual(gather_rows(dual, index)).tangent, torch.ones(4, 6))
    with use_backend("torch"):
        gather_rows(table, index)
    assert native_gathers == [4, 4]
