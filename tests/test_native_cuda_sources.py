"""The CUDA sources compile on any machine with nvcc (no GPU, no torch CUDA headers needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parent.parent / "csrc" / "cuda"
CU_FILES = sorted(CUDA_DIR.glob("*.cu"))


def test_every_kernel_family_has_a_cuda_source():
    assert {path.stem for path in CU_FILES} >= {"sparse_adam_update", "coalesce", "id_map"}


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found: the CUDA sources are not compiled here")
@pytest.mark.parametrize("source", CU_FILES, ids=[path.name for path in CU_FILES])
def test_cuda_source_compiles_with_nvcc_alone(source, tmp_path):
    command = ["nvcc", "-c", "-arch=sm_90", "-std=c++17", str(source), "-o", str(tmp_path / f"{source.stem}.o")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
