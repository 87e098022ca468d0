"""Which kernels run: the one place where recis chooses between its two backends.

- ``native``: the C++/CUDA kernels of ``csrc/`` (``native_kernels.py``, ``native_id_map.py``).
  A device the library has no kernels for, or a library that cannot be loaded or built,
  is an error at the first kernel call, never a fallback; so is a tensor layout a native
  kernel does not take (the error names the layout and says ``RECIS_BACKEND=torch`` runs it).
- ``torch``: the vectorized pure-torch kernels, the reference the native ones are tested against.
- ``auto`` (or unset): ``native`` for the devices it loads for; for any other device the
  torch kernels, announced by one warning per device type.

The backend in force is ``use_backend(name)`` where one is active, else ``RECIS_BACKEND``,
read at each call (so a process, and the ranks it spawns, follow the environment).
``choose_backend`` decides for every kernel call, at call time, so tests can switch
backends within one process.

Some routings are made on purpose, under ``native`` too (``TORCH_KERNELS_UNDER_NATIVE``):
AdamWTF's multi-tensor update of CUDA tensors runs torch's ``_foreach`` kernels, which
are fused multi-tensor CUDA kernels already; recis has no CUDA kernel of its own for it.
The Adagrad updates (element-wise and row-wise), the hash partitioning (``owner_rank``,
``unique_by_owner``), ``sum_by_index`` and ``gather_rows`` have CPU kernels only. Each routing
is announced by one warning when it first happens.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import torch

from recis.ops.native_library import has_kernels_for, load_native_library

BACKENDS = ("auto", "native", "torch")
TORCH_KERNELS_UNDER_NATIVE = {
    ("adamw_tf_multi_tensor", "cuda"): "recis has no CUDA kernel for it; torch's _foreach kernels are fused on CUDA",
    **{
        (op, "cuda"): "recis has no CUDA kernel for it; the torch one runs on the GPU"
        for op in (
            "sum_by_index",
            "gather_rows",
            "owner_rank",
            "unique_by_owner",
            "sparse_adagrad_update",
            "sparse_row_wise_adagrad_update",
        )
    },
}
_override: list[str] = []  # the stack of use_backend names, innermost last
_announced: set[str] = set()


def requested_backend() -> str:
    """The backend asked for: the innermost ``use_backend``, else ``RECIS_BACKEND`` (default ``auto``)."""
    if _override:
        return _override[-1]
    return _checked(os.environ.get("RECIS_BACKEND", "auto").strip().lower() or "auto", "RECIS_BACKEND")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernels called inside the block on backend ``name`` (``auto``, ``native`` or ``torch``).

    Only this process: spawned processes follow ``RECIS_BACKEND``.
    """
    _override.append(_checked(name, "use_backend"))
    try:
        yield
    finally:
        _override.pop()


@functools.cache
def native_problem(device_type: str) -> str | None:
    """Why the native kernels cannot run on ``device_type`` tensors, or None when they can."""
    try:
        load_native_library()
    except Exception as error:  # a failed compiler run raises several kinds of errors
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        return f"the native kernels could not be loaded or built ({reason})"
    if not has_kernels_for(torch.device(device_type)):
        return f"the native library has no {device_type} kernels (built without them)"
    return None


def choose_backend(device: torch.device | str = "cpu", op: str | None = None) -> str:
    """The backend, ``"native"`` or ``"torch"``, that runs kernel ``op`` on tensors of ``device`` now.

    Raises under ``native`` when the native kernels cannot run on ``device``; warns once
    per announcement under ``auto`` and for the routings of ``TORCH_KERNELS_UNDER_NATIVE``.
    """
    requested = requested_backend()
    if requested == "torch":
        return "torch"
    device_type = torch.device(device).type
    problem = native_problem(device_type)
    if problem is not None:
        if requested == "native":
            raise RuntimeError(f"RECIS_BACKEND=native but {problem}; RECIS_BACKEND=torch runs the torch kernels")
        _announce(f"recis: {problem}; using the torch kernels for {device_type} tensors")
        return "torch"
    routed = TORCH_KERNELS_UNDER_NATIVE.get((op, device_type))
    if routed is not None:
        _announce(f"recis: {op} on {device_type} runs torch's kernels ({routed})")
        return "torch"
    return "native"


def _checked(name: str, source: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def _announce(message: str) -> None:
    """One warning per distinct message and process."""
    if message not in _announced:
        _announced.add(message)
        warnings.warn(message, stacklevel=3)
