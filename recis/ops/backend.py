"""Which kernels recis runs: ``RECIS_BACKEND=native|torch`` (default: native when available).

- ``native``: the C++/CUDA kernels of ``csrc/``; an error if they cannot be loaded or built.
- ``torch``: the vectorized pure-torch kernels, the reference the native ones are tested against.
- unset or ``auto``: native when it loads, else torch with a one-line warning.
"""

from __future__ import annotations

import os
import warnings

from recis.ops.native_library import load_native_library

BACKENDS = ("auto", "native", "torch")


def choose_backend() -> str:
    """The backend to run, ``"native"`` or ``"torch"``, per ``RECIS_BACKEND``."""
    requested = os.environ.get("RECIS_BACKEND", "auto").strip().lower() or "auto"
    if requested not in BACKENDS:
        raise ValueError(f"RECIS_BACKEND must be one of {BACKENDS}, got {requested!r}")
    if requested == "torch":
        return "torch"
    try:
        load_native_library()
    except Exception as error:  # a failed compiler run raises several kinds of errors
        if requested == "native":
            raise RuntimeError("RECIS_BACKEND=native but the native kernels could not be loaded or built") from error
        reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
        warnings.warn(f"recis: native kernels unavailable ({reason}); using the torch kernels", stacklevel=2)
        return "torch"
    return "native"
