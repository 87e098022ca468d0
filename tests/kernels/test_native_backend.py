"""RECIS_BACKEND chooses the kernels; a failed native load falls back with one warning."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest

from recis.ops import backend


def _backend_in_subprocess(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECIS_BACKEND": value}
    code = "import recis.ops; print(recis.ops.BACKEND, recis.ops.IdMap.__name__)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)


def test_torch_backend_is_chosen_by_the_environment():
    result = _backend_in_subprocess("torch")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["torch", "IdMap"]


def test_an_unknown_backend_is_an_error():
    result = _backend_in_subprocess("cuda-please")
    assert result.returncode != 0 and "RECIS_BACKEND must be one of" in result.stderr


def test_auto_falls_back_to_torch_with_a_one_line_warning(monkeypatch):
    def broken() -> None:
        raise OSError("no compiler here\nsecond line")

    monkeypatch.setattr(backend, "load_native_library", broken)
    monkeypatch.setenv("RECIS_BACKEND", "auto")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert backend.choose_backend() == "torch"
    assert len(caught) == 1 and "\n" not in str(caught[0].message) and "no compiler here" in str(caught[0].message)


def test_native_backend_refuses_to_fall_back(monkeypatch):
    monkeypatch.setattr(backend, "load_native_library", lambda: (_ for _ in ()).throw(OSError("broken")))
    monkeypatch.setenv("RECIS_BACKEND", "native")
    with pytest.raises(RuntimeError, match="RECIS_BACKEND=native"):
        backend.choose_backend()
