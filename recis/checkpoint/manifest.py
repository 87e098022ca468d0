"""The manifest of a checkpoint directory, and where checkpoints live.

A checkpoint root holds complete checkpoints ``ckpt-<sequence>[-step<n>]/``, each with
``manifest.json`` plus ``rank<r>.bin`` (streamed rows) and ``rank<r>.pt`` (everything
small) per rank, and a ``latest`` file naming the newest complete one. The manifest is
written last, inside a temporary directory that is renamed into place afterwards,
and ``latest`` is replaced only after that: a checkpoint without a manifest is never
complete, and a half-written one is never named by ``latest``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from recis.checkpoint.row_file import file_crc32

FORMAT = "recis-checkpoint-1"
MANIFEST = "manifest.json"
LATEST = "latest"
PREFIX = "ckpt-"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, damaged or does not fit the run."""


def rank_file(rank: int, suffix: str) -> str:
    return f"rank{rank:05d}.{suffix}"


def write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` by ``text`` so that readers see the old or the new content, never a mix."""
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w") as file:
        file.write(text)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    sync_directory(path.parent)


def sync_directory(path: Path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(sequence, directory) of every complete checkpoint under ``root``, oldest first."""
    found = []
    for directory in root.glob(f"{PREFIX}*"):
        manifest = directory / MANIFEST
        if manifest.is_file():
            found.append((json.loads(manifest.read_text())["sequence"], directory))
    return sorted(found)


def resolve(path: str | os.PathLike) -> Path:
    """The checkpoint directory ``path`` names: itself if complete, else its root's ``latest``."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    latest = path / LATEST
    if not latest.is_file():
        if path.name.startswith((".", PREFIX)) and path.is_dir():
            raise CheckpointError(f"{path}: no {MANIFEST}: an incomplete checkpoint, which is never loaded")
        raise FileNotFoundError(f"{path}: no checkpoint (no {LATEST} file and no {MANIFEST})")
    directory = path / latest.read_text().strip()
    if not (directory / MANIFEST).is_file():
        raise CheckpointError(f"{latest} names {directory.name}, which has no {MANIFEST}")
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{directory / MANIFEST}: unreadable ({error})") from error
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{directory / MANIFEST}: format is {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def verify_files(directory: Path, manifest: dict[str, Any]) -> None:
    """Raise ``CheckpointError`` naming the first file whose size or CRC-32 differs from the manifest."""
    for name, expected in sorted(manifest["files"].items()):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (field 'files')")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path}: {size} bytes, the manifest says {expected['bytes']} (field 'bytes')")
        if file_crc32(path) != expected["crc32"]:
            raise CheckpointError(f"{path}: contents differ from the manifest's checksum (field 'crc32')")
