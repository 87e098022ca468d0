"""One binary file per rank holding its saved tables, streamed in chunks.

Each field of a saved table (ids, weight, one per slot) is written as one contiguous
little-endian array of ``count`` rows of ``width`` elements, chunk by chunk, so
neither saving nor loading ever holds more than a chunk beyond the tables
themselves. The writer returns where each field lies and the CRC-32 of the file.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import torch

CHUNK_BYTES = 16 << 20


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_of(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def rows_per_chunk(row_bytes: int) -> int:
    """Rows of ``row_bytes`` each that fit in one chunk."""
    return max(1, CHUNK_BYTES // max(1, row_bytes))


class RowFileWriter:
    """Appends fields to a file, tracking offsets, size and CRC-32; fsyncs on close."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 (closed in close())
        self.bytes_written = 0
        self.crc32 = 0

    def write_field(self, array: torch.Tensor) -> dict[str, Any]:
        """Stream a 2-D array; returns its description for the manifest."""
        count, width = array.shape
        offset = self.bytes_written
        step = rows_per_chunk(width * array.element_size())
        for start in range(0, count, step):
            chunk = array[start : start + step].contiguous().cpu().view(torch.uint8).numpy()
            self._file.write(memoryview(chunk))
            self.crc32 = zlib.crc32(chunk, self.crc32)
            self.bytes_written += chunk.nbytes
        return {"dtype": dtype_name(array.dtype), "width": width, "offset": offset}

    def close(self) -> dict[str, int]:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        return {"bytes": self.bytes_written, "crc32": self.crc32}


def read_field_chunks(
    path: Path, field: dict[str, Any], count: int, chunk_rows: int | None = None
) -> Iterator[torch.Tensor]:
    """Yield a saved field as 2-D tensors of at most ``chunk_rows`` rows, in order."""
    dtype, width, size = dtype_of(field["dtype"]), field["width"], row_bytes(field)
    step = chunk_rows or rows_per_chunk(size)
    with open(path, "rb") as file:
        file.seek(field["offset"])
        for start in range(0, count, step):
            rows = min(step, count - start)
            buffer = bytearray(rows * size)
            if file.readinto(buffer) != len(buffer):
                raise ValueError(f"{path}: ends before the field at offset {field['offset']} (truncated file)")
            yield torch.frombuffer(buffer, dtype=dtype).reshape(rows, width)


def row_bytes(field: dict[str, Any]) -> int:
    return field["width"] * torch.empty((), dtype=dtype_of(field["dtype"])).element_size()


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as file:
        while block := file.read(CHUNK_BYTES):
            crc = zlib.crc32(block, crc)
    return crc
