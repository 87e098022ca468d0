"""How the CUDA kernels are built: only with a CUDA toolkit whose runtime headers torch finds, and,
when torch cannot tell which GPUs to build for (no GPU visible at build time,
``TORCH_CUDA_ARCH_LIST`` unset), for the architectures torch was built for that nvcc compiles."""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils.cpp_extension

from recis.ops import native_library

TORCH_ARCHES = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_90a", "sm_100", "sm_120", "compute_120"]


@pytest.fixture
def no_gpu_visible(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")  # empty counts as unset; restored after the test
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(TORCH_ARCHES))


def test_without_a_gpu_the_arches_torch_was_built_for_that_nvcc_compiles_newest_as_ptx(no_gpu_visible, monkeypatch):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: {"75", "80", "86", "89", "90", "100"})
    assert native_library.cuda_arch_list() == "7.5;8.0;8.6;9.0;10.0+PTX"


def test_without_word_from_nvcc_all_numbered_arches_torch_was_built_for(no_gpu_visible, monkeypatch):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: None)
    assert native_library.cuda_arch_list() == "7.5;8.0;8.6;9.0;10.0;12.0+PTX"


def test_a_set_arch_list_or_a_visible_gpu_is_left_to_torch(no_gpu_visible, monkeypatch):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0")
    assert native_library.cuda_arch_list() is None
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert native_library.cuda_arch_list() is None


def test_nothing_known_gives_no_list(no_gpu_visible, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: [])
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: None)
    assert native_library.cuda_arch_list() is None
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: ["sm_120"])
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: {"75"})  # an nvcc older than torch's
    assert native_library.cuda_arch_list() is None


def test_choosing_sets_the_environment_for_torchs_build_and_says_so(no_gpu_visible, monkeypatch, capsys):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: {"80", "90"})
    native_library.choose_cuda_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;9.0+PTX"
    assert "8.0;9.0+PTX" in capsys.readouterr().out


def test_cuda_kernels_are_built_only_where_the_toolkit_has_its_runtime_headers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.delenv("CUDA_INC_PATH", raising=False)
    assert not native_library.cuda_buildable()
    assert "no cuda_runtime.h" in capsys.readouterr().out
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").touch()
    assert native_library.cuda_buildable()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch
    assert not native_library.cuda_buildable()


def test_cuda_inc_path_counts_as_torch_counts_it(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path / "home"))
    (tmp_path / "headers").mkdir()
    (tmp_path / "headers" / "cuda_runtime.h").touch()
    monkeypatch.setenv("CUDA_INC_PATH", str(tmp_path / "headers"))
    assert native_library.cuda_buildable()
