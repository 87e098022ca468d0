"""Build script: the native kernels of csrc/ as the extension ``recis._C``.

The CPU kernels are always built; the CUDA kernels too when torch has CUDA and a CUDA
toolkit is found (with no GPU visible and TORCH_CUDA_ARCH_LIST unset, for the
architectures torch was built for: recis/ops/native_library.py). The build needs the
installed torch, so install without build isolation (an isolated build would download
another torch):

    pip install --no-build-isolation -e .

Without torch at build time (an isolated build), or with RECIS_NO_NATIVE_BUILD=1, the
package installs as pure Python and recis compiles the kernels on first use
(recis/ops/native_library.py), or runs its torch kernels.
"""

import importlib.util
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def _native_library_module():
    """recis/ops/native_library.py, loaded alone (importing recis would build the kernels)."""
    spec = importlib.util.spec_from_file_location("_recis_native_library", ROOT / "recis" / "ops" / "native_library.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _native_extension() -> dict:
    if os.environ.get("RECIS_NO_NATIVE_BUILD"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        return {}
    library = _native_library_module()
    sources = library.cpu_sources(ROOT / "csrc")
    flags = {"cxx": ["-O3"]}
    extension = CppExtension
    if library.cuda_buildable():
        os.environ.update(library.cuda_build_environment())  # for torch's build, in this process only
        sources += library.cuda_sources(ROOT / "csrc")
        flags = {"cxx": ["-O3", "-DRECIS_WITH_CUDA"], "nvcc": ["-O3"]}
        extension = CUDAExtension
    relative = [str(path.relative_to(ROOT)) for path in sources]
    return {
        "ext_modules": [extension("recis._C", relative, extra_compile_args=flags)],
        "cmdclass": {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    }


setup(**_native_extension())
