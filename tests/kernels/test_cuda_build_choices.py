"""How the CUDA kernels are built: only with a CUDA toolkit whose runtime headers torch finds, and,
when torch cannot tell which GPUs to build for (no GPU visible at build time,
``TORCH_CUDA_ARCH_LIST`` unset), for the architectures torch was built for that nvcc compiles."""

from __future__ import annotations

import os

import pytest
import torch
import torch.utils.cpp_extension

from recis.ops import native_library

TORCH_ARCHES = ["sm_120", "sm_75", "sm_90a", "sm_100", "sm_80", "compute_120", "sm_86", "sm_90"]  # any order


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


def test_torchs_build_accepts_the_list(no_gpu_visible, monkeypatch):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: None)
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", native_library.cuda_arch_list())
    flags = torch.utils.cpp_extension._get_cuda_arch_flags()
    assert "-gencode=arch=compute_75,code=sm_75" in flags
    assert "-gencode=arch=compute_120,code=compute_120" in flags  # the newest also as PTX


def test_the_arches_nvcc_lists_are_read_from_the_toolkits_nvcc(tmp_path, monkeypatch):
    nvcc = tmp_path / "bin" / "nvcc"
    nvcc.parent.mkdir()
    nvcc.write_text("#!/bin/sh\nprintf 'compute_75\\ncompute_90\\ncompute_100\\n'\n")
    nvcc.chmod(0o755)
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    assert native_library._nvcc_arches() == {"75", "90", "100"}
    nvcc.write_text("#!/bin/sh\nexit 1\n")  # an nvcc without --list-gpu-arch
    assert native_library._nvcc_arches() is None


def test_the_build_environment_names_the_arches_and_says_so(no_gpu_visible, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(native_library, "_nvcc_arches", lambda: {"80", "90"})
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    assert native_library.cuda_build_environment() == {"TORCH_CUDA_ARCH_LIST": "8.0;9.0+PTX"}
    assert "8.0;9.0+PTX" in capsys.readouterr().out


def test_headers_only_under_the_toolkits_targets_are_passed_as_cuda_inc_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    for variable in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        monkeypatch.delenv(variable, raising=False)
    headers = tmp_path / "targets" / "x86_64-linux" / "include"
    headers.mkdir(parents=True)
    (headers / "cuda_runtime.h").touch()
    assert native_library.cuda_buildable()
    assert native_library.cuda_build_environment() == {"CUDA_INC_PATH": str(headers)}


def test_the_build_environment_is_undone_after_the_build(monkeypatch):
    monkeypatch.setenv("CUDA_INC_PATH", "/given")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    with native_library.environment({"CUDA_INC_PATH": "/set", "TORCH_CUDA_ARCH_LIST": "9.0"}):
        assert (os.environ["CUDA_INC_PATH"], os.environ["TORCH_CUDA_ARCH_LIST"]) == ("/set", "9.0")
    assert os.environ["CUDA_INC_PATH"] == "/given"
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ


def test_cuda_kernels_are_built_only_where_the_toolkit_has_its_runtime_headers(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path))
    for variable in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        monkeypatch.delenv(variable, raising=False)
    assert not native_library.cuda_buildable()
    assert "no cuda_runtime.h" in capsys.readouterr().out
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "cuda_runtime.h").touch()
    assert native_library.cuda_buildable()
    monkeypatch.setattr(torch.version, "cuda", None)  # a CPU build of torch
    assert not native_library.cuda_buildable()


@pytest.mark.parametrize("variable", ["CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"])
def test_headers_the_compiler_is_pointed_to_count(variable, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.utils.cpp_extension, "CUDA_HOME", str(tmp_path / "home"))
    for name in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert not native_library.cuda_buildable()
    (tmp_path / "headers").mkdir()
    (tmp_path / "headers" / "cuda_runtime.h").touch()
    monkeypatch.setenv(variable, os.pathsep.join(["/nowhere", str(tmp_path / "headers")]))
    assert native_library.cuda_buildable()
