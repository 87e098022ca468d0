"""Row stores on transparent huge pages (Linux): fewer TLB misses when rows are random.

A sparse step touches rows scattered over the whole table; with 4 KiB pages almost
every touched row of weight, exp_avg and exp_avg_sq costs a TLB miss and a page walk.
Advising the kernel (``madvise(MADV_HUGEPAGE)``) before the pages are first written
lets it back them with 2 MiB pages where the system allows (``transparent_hugepage``
set to ``madvise`` or ``always``). torch can do this for every allocation
(``THP_MEM_ALLOC_ENABLE=1``); recis asks only for its own large row stores.
``RECIS_HUGE_PAGES=0`` turns it off. Elsewhere (no Linux, CUDA tensors) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

import torch

HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # linux/mman.h


def _load_madvise():
    if not sys.platform.startswith("linux") or os.environ.get("RECIS_HUGE_PAGES", "1").strip() == "0":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    madvise = libc.madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def advise_huge_pages(tensor: torch.Tensor) -> bool:
    """Ask for huge pages under the 2 MiB-aligned part of ``tensor``'s memory; True if asked and accepted.

    Pages already written keep their size (the kernel may merge them later), so call it
    on a tensor from ``torch.empty`` before filling it, as ``empty_rows`` does.
    """
    if _madvise is None or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return False
    storage = tensor.untyped_storage()  # the range never leaves the tensor's own allocation
    start = max(tensor.data_ptr(), storage.data_ptr())
    stop = min(tensor.data_ptr() + tensor.numel() * tensor.element_size(), storage.data_ptr() + storage.nbytes())
    first = -(-start // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES
    end = stop // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    return end > first and _madvise(first, end - first, _MADV_HUGEPAGE) == 0


def empty_rows(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(shape)``, on huge pages where that is possible and the tensor is large enough.

    Never an inference tensor: a table outlives any ``torch.inference_mode`` block it grows in.
    """
    with torch.inference_mode(False):
        storage = torch.empty(shape, dtype=dtype, device=device)
    advise_huge_pages(storage)
    return storage


def zero_rows(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(shape)``, on huge pages where possible (advised before the first write)."""
    return empty_rows(shape, dtype=dtype, device=device).zero_()
