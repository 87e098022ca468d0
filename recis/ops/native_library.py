"""Loading of the native library built from ``csrc/`` (operators ``torch.ops.recis.*``).

The library built by ``setup.py`` (``recis/_C*.so``) is loaded when present; otherwise
the sources are compiled once with ``torch.utils.cpp_extension.load`` (cached under
``TORCH_EXTENSIONS_DIR``, about half a minute on 2 cores), with the CUDA kernels when
torch has CUDA and a CUDA toolkit is found.
"""

from __future__ import annotations

import importlib.machinery
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
    """Whether this torch has CUDA and a CUDA toolkit to compile with."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


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
    if cuda_buildable():
        sources += cuda_sources()
        flags.update(extra_cuda_cflags=["-O3"], extra_cflags=["-O3", "-DRECIS_WITH_CUDA"])
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
