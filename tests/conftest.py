"""The ``backend`` fixture: the tests that run kernels run once per kernel backend.

Every test has the fixture. The tests of ``ON_BOTH_BACKENDS`` (folders or files under
tests/) are parametrized with ``native`` and ``torch``: the kernels of that test run on
that backend (``recis.ops.use_backend``), and so do processes it spawns
(``RECIS_BACKEND``). The other tests run on the backend of the environment, as a user's
program does: the selection tests themselves, the kernel tests that compare both
backends side by side, and the torchrun and example runs (to keep the suite's time).

``native`` is skipped, saying why, where the native library cannot load, unless
``RECIS_BACKEND=native`` asks for it (as CI does): then that is a failure.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from recis.ops.backend import native_problem, use_backend

TESTS = Path(__file__).resolve().parent
ON_BOTH_BACKENDS = (
    "checkpoint",
    "conformance/test_bad_input.py",
    "conformance/test_nothing_changes_on_error.py",
    "conformance/test_reference_values.py",
    "conformance/test_torch_conventions.py",
    "distributed/test_dist_behaviour.py",
    "distributed/test_dist_equivalence.py",
    "distributed/test_grouped_exchange.py",
    "distributed/test_rank_backend.py",
    "nn",
    "optim",
    "store",
)
BACKEND_NAMES = ("native", "torch")


def _on_both_backends(path: Path) -> bool:
    relative = path.resolve().relative_to(TESTS).as_posix()
    return any(relative == entry or relative.startswith(f"{entry}/") for entry in ON_BOTH_BACKENDS)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" in metafunc.fixturenames and _on_both_backends(metafunc.definition.path):
        metafunc.parametrize("backend", BACKEND_NAMES, indirect=True)


@pytest.fixture(autouse=True)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch):
    """The backend the test's kernels run on: its parameter, or None (the environment's)."""
    name = getattr(request, "param", None)
    if name is None:
        yield None
        return
    if name == "native" and native_problem("cpu") is not None:
        message = f"native backend unavailable: {native_problem('cpu')}"
        if os.environ.get("RECIS_BACKEND", "").strip().lower() == "native":
            pytest.fail(f"RECIS_BACKEND=native but {message}")
        pytest.skip(message)
    monkeypatch.setenv("RECIS_BACKEND", name)
    with use_backend(name):
        yield name
