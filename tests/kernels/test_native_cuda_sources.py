"""The CUDA sources compile on any machine with nvcc (no GPU needed), and so does their
torch binding, against this torch's own CUDA headers; the binding calls only launchers
the ``.cu`` objects define, with the same signatures.

torch is built with ``-std=c++20`` (``torch.utils.cpp_extension``), so both checks use it.
The CPU wheel lacks only ``c10/cuda/impl/cuda_cmake_macros.h``, which c10 skips under
``C10_CUDA_NO_CMAKE_CONFIGURE_FILE``; nothing else is stubbed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch.utils.cpp_extension as cpp_extension

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))
NVCC = shutil.which("nvcc")


def _cuda_include() -> Path | None:
    """The toolkit's include directory (torch reports no CUDA_HOME when it has no CUDA)."""
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if NVCC:
        homes.append(str(Path(NVCC).resolve().parent.parent))
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime_api.h").exists():
            return Path(home) / "include"
    return None


CUDA_INCLUDE = _cuda_include()

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found: the CUDA sources are not compiled here")
needs_toolkit = pytest.mark.skipif(
    CUDA_INCLUDE is None or shutil.which("nm") is None or shutil.which("c++") is None,
    reason="no CUDA toolkit, C++ compiler or nm here",
)


def _compile(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cuda_objects(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    out = tmp_path_factory.mktemp("cuda_objects")
    objects = {}
    for source in CU_FILES:
        target = out / f"{source.stem}.o"
        command = [NVCC, "-c", "-arch=sm_90", "-std=c++20", str(source), "-o", str(target)]
        objects[source.name] = (target, _compile(command))
    return objects


@pytest.fixture(scope="module")
def binding_object(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp("cuda_binding") / "binding.o"
    includes = [*cpp_extension.include_paths(), str(CUDA_INCLUDE)]
    command = [
        "c++", "-std=c++20", "-c", "-fPIC", "-DRECIS_WITH_CUDA", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
        *(f"-I{path}" for path in includes), str(CUDA_DIR / "binding.cpp"), "-o", str(target),
    ]  # fmt: skip
    result = _compile(command)
    assert result.returncode == 0, result.stderr[-3000:]
    return target


def _recis_symbols(obj: Path, *, defined: bool) -> set[str]:
    flag = "--defined-only" if defined else "--undefined-only"
    listing = subprocess.run(["nm", "-C", flag, str(obj)], capture_output=True, text=True, check=True).stdout
    names = {line.split(maxsplit=2)[-1] if defined else line.split(maxsplit=1)[-1] for line in listing.splitlines()}
    return {name for name in names if name.startswith("recis::cuda::") and "(anonymous namespace)" not in name}


def test_every_kernel_family_has_a_cuda_source():
    assert {path.stem for path in CU_FILES} >= {"sparse_adam_update", "coalesce", "id_map"}


@needs_nvcc
@pytest.mark.parametrize("source", CU_FILES, ids=[path.name for path in CU_FILES])
def test_cuda_source_compiles_with_nvcc_alone(source, cuda_objects):
    _, result = cuda_objects[source.name]
    assert result.returncode == 0, result.stderr[-3000:]


@needs_toolkit
def test_cuda_binding_compiles_against_torch_cuda_headers(binding_object):
    assert binding_object.stat().st_size > 0


@needs_nvcc
@needs_toolkit
def test_binding_calls_only_launchers_the_cu_objects_define(binding_object, cuda_objects):
    called = _recis_symbols(binding_object, defined=False)
    defined = set().union(*(_recis_symbols(obj, defined=True) for obj, _ in cuda_objects.values()))
    assert {"recis::cuda::sparse_adam_update", "recis::cuda::id_map_find"} <= {name.split("(")[0] for name in called}
    assert called <= defined, f"launchers called but not defined (signature drift?): {sorted(called - defined)}"
