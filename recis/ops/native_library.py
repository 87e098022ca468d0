"""Loading of the native library built from ``csrc/`` (operators ``torch.ops.recis.*``).

The library built by ``setup.py`` (``recis/_C*.so``) is loaded when present; otherwise
the sources are compiled once with ``torch.utils.cpp_extension.load`` (cached under
``TORCH_EXTENSIONS_DIR``, about half a minute on 2 cores), with the CUDA kernels when
torch has CUDA and a CUDA toolkit is found.

Where no GPU is visible at build time (a container build, a login node) and
``TORCH_CUDA_ARCH_LIST`` is unset, torch cannot tell which GPUs to compile for (torch
2.13 fails with an IndexError); the kernels are then built for the architectures torch
itself was built for (``cuda_arch_list``). A toolkit whose runtime headers cannot be
found gives the CPU kernels only, with a message (``cuda_buildable``).
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
CSRC_DIR = _PACKAGE_DIR.parent / "csrc"
_loaded = False


def cpu_sources(csrc: Path = CSRC_DIR) -> list[Path]:
    """The operator schemas and the CPU kernels."""
    return [csrc / "ops.cpp", *sorted((csrc / "cpu").glob("*.cpp"))]


def cuda_sources(csrc: Path = CSRC_DIR) -> list[Path]:
    """The CUDA kernels (``.cu``, CUDA headers only) and their torch binding."""
    return [*sorted((csrc / "cuda").glob("*.cu")), csrc / "cuda" / "binding.cpp"]


def cuda_buildable() -> bool:
    """Whether this torch has CUDA and a CUDA toolkit to compile with: nvcc and the runtime headers
    (``cuda_include_dir``). Without the headers only the CPU kernels are built, and it says so."""
    from torch.utils.cpp_extension import CUDA_HOME

    if torch.version.cuda is None or CUDA_HOME is None:
        return False
    if cuda_include_dir() is None:
        print(
            f"recis: torch has CUDA but no cuda_runtime.h was found under {CUDA_HOME} (CUDA_HOME, guessed "
            "from the nvcc on the PATH when unset), CUDA_INC_PATH, CPATH or CPLUS_INCLUDE_PATH: building the "
            "CPU kernels only (set CUDA_HOME to the CUDA toolkit for the CUDA kernels)"
        )
        return False
    return True


def cuda_include_dir() -> Path | None:
    """Where the compiler finds ``cuda_runtime.h``: a directory torch's build passes or the compiler
    searches (``CUDA_HOME/include``, ``CUDA_INC_PATH``, ``CPATH``, ``CPLUS_INCLUDE_PATH``), else the
    toolkit's ``targets/*/include`` (conda's layout, which torch does not pass), else None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    searched = [Path(CUDA_HOME) / "include"]
    for variable in ("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH"):
        searched += [Path(entry) for entry in os.environ.get(variable, "").split(os.pathsep) if entry]
    searched += sorted(Path(CUDA_HOME).glob("targets/*/include"))
    return next((directory for directory in searched if (directory / "cuda_runtime.h").exists()), None)


def cuda_arch_list() -> str | None:
    """The ``TORCH_CUDA_ARCH_LIST`` to build the CUDA kernels with when none is set and no GPU is
    visible: the architectures torch was built for that this toolkit's nvcc compiles, the newest
    also as PTX (for later GPUs), e.g. ``"7.5;8.0;9.0+PTX"``. None when the user set one, a GPU is
    visible (torch then compiles for the visible GPUs) or none is known (torch's own error follows:
    set ``TORCH_CUDA_ARCH_LIST``)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST") or torch.cuda.device_count() > 0:
        return None
    arches = [arch[3:] for arch in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", arch)]
    compilable = _nvcc_arches()
    if compilable is not None:
        arches = [arch for arch in arches if arch in compilable]
    if not arches:
        return None
    versions = [f"{arch[:-1]}.{arch[-1]}" for arch in sorted(arches, key=int)]
    return ";".join(versions) + "+PTX"


def _nvcc_arches() -> set[str] | None:
    """The ``NN`` of every ``compute_NN`` this toolkit's nvcc lists, or None when it cannot say."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    try:
        listed = subprocess.run(
            [str(Path(CUDA_HOME) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    found = set(re.findall(r"compute_(\d+)\b", listed.stdout))
    return found if listed.returncode == 0 and found else None


def cuda_build_environment() -> dict[str, str]:
    """What torch's CUDA build needs in the environment that it cannot find by itself: the
    architectures (``cuda_arch_list``) and the headers' directory when only the toolkit's
    ``targets/*/include`` has them (as ``CUDA_INC_PATH``). Says what it sets."""
    settings = {}
    arch_list = cuda_arch_list()
    if arch_list is not None:
        print(f"recis: no GPU visible and TORCH_CUDA_ARCH_LIST unset: building the CUDA kernels for {arch_list}")
        settings["TORCH_CUDA_ARCH_LIST"] = arch_list
    include = cuda_include_dir()
    if include is not None and include.parent.parent.name == "targets" and not os.environ.get("CUDA_INC_PATH"):
        print(f"recis: the CUDA runtime headers are in {include}: passing it as CUDA_INC_PATH")
        settings["CUDA_INC_PATH"] = str(include)
    return settings


@contextlib.contextmanager
def environment(settings: dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated with ``settings`` inside the block, as it was after it."""
    before = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _prebuilt() -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _PACKAGE_DIR / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def _jit_build() -> None:
    from torch.utils.cpp_extension import load

    if not (CSRC_DIR / "ops.cpp").exists():
        raise FileNotFoundError(f"no built recis._C and no sources in {CSRC_DIR}")
    sources = cpu_sources()
    flags = {"extra_cflags": ["-O3"]}
    settings = {}
    if cuda_buildable():
        settings = cuda_build_environment()
        sources += cuda_sources()
        flags.update(extra_cuda_cflags=["-O3"], extra_cflags=["-O3", "-DRECIS_WITH_CUDA"])
    with environment(settings):  # the user's process keeps its own environment
        load(name="recis_native", sources=[str(s) for s in sources], is_python_module=False, **flags)


def load_native_library() -> None:
    """Make ``torch.ops.recis`` available; raises when it can be neither found nor built."""
    global _loaded
    if _loaded:
        return
    prebuilt = _prebuilt()
    if prebuilt is not None:
        torch.ops.load_library(str(prebuilt))
    else:
        _jit_build()
    _loaded = True


def has_kernels_for(device: torch.device) -> bool:
    """Whether the loaded library has kernels for tensors on ``device`` (CUDA ones only when built with CUDA)."""
    key = "CPU" if device.type == "cpu" else "CUDA" if device.type == "cuda" else None
    return key is not None and torch._C._dispatch_has_kernel_for_dispatch_key("recis::id_map_find", key)
