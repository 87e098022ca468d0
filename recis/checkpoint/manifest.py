"""The manifest of a checkpoint directory, and where checkpoints live.

A checkpoint root holds complete checkpoints ``ckpt-<sequence>[-step<n>]/``, each with
``manifest.json`` plus ``rank<r>.bin`` (streamed rows) and ``rank<r>.pt`` (everything
small) per rank, and a ``latest`` file naming the newest complete one. The manifest is
written last, inside a temporary directory that is renamed into place afterwards,
and ``latest`` is replaced only after that: a checkpoint without a manifest is never
complete, and a half-written one is never named by ``latest``.

The manifest verifies itself. Format ``recis-checkpoint-2`` holds ``sha256``: the
SHA-256, in lowercase hex, of the canonical serialization of every other field
(``canonical``: JSON with sorted keys, no whitespace, ASCII only). The file itself is
indented; whitespace is outside the checksum and carries nothing. ``read_manifest``
refuses, with ``CheckpointError`` naming the file and the field, a manifest that is not
strict JSON (UTF-8, no repeated key, no NaN), whose checksum does not match, or that
breaks the schema of ``manifest_schema`` (which also ties counts, widths and offsets to
the row files' sizes); ``load`` reads it before anything changes.

Manifests written before the checksum (format ``recis-checkpoint-1``, no ``sha256``)
were written by this project and are still loaded, after the same schema check; their
files get the same size and CRC-32 check. A change the schema cannot see (the time
stamp, the step in the name, a table's class, none of them data) goes unnoticed in
them; every other single-bit flip of one is refused (tested).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from recis.checkpoint.manifest_schema import CHECKSUM, SchemaError, check_schema
from recis.checkpoint.row_file import file_crc32

FORMAT = "recis-checkpoint-2"
LEGACY_FORMAT = "recis-checkpoint-1"  # before the manifest held its checksum; still loaded
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
    """(sequence, directory) of every complete checkpoint under ``root``, oldest first.

    The sequence is read from the directory's name (``ckpt-<sequence>[-step<n>]``, as
    ``save`` names it), not from its manifest, so a damaged manifest of an old checkpoint
    never stops a save (nor its pruning); directories named otherwise are left alone.
    """
    found = []
    for directory in root.glob(f"{PREFIX}*"):
        named = re.fullmatch(rf"{PREFIX}(\d+)(-step.*)?", directory.name)
        if named and (directory / MANIFEST).is_file():
            found.append((int(named.group(1)), directory))
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


def canonical(body: dict[str, Any]) -> bytes:
    """The bytes the checksum covers: JSON with sorted keys, no whitespace, ASCII only, no NaN."""
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def manifest_text(body: dict[str, Any]) -> str:
    """The text of ``manifest.json`` for ``body``: format 2, with its ``sha256``."""
    body = {**body, "format": FORMAT}
    return json.dumps({**body, CHECKSUM: hashlib.sha256(canonical(body)).hexdigest()}, indent=1, sort_keys=True)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ValueError(f"key {repeated[0]!r} appears twice in one object")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def _parsed(path: Path) -> Any:
    """The manifest as strict JSON (UTF-8, no repeated key, no NaN or Infinity)."""
    try:
        text = path.read_bytes().decode("utf-8")
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except (OSError, ValueError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{path}: unreadable ({error})") from error


def read_manifest(directory: Path) -> dict[str, Any]:
    """The manifest of ``directory``, verified (module docstring); ``CheckpointError`` naming the
    file and field otherwise."""
    path = directory / MANIFEST
    manifest = _parsed(path)
    kind = manifest.get("format") if isinstance(manifest, dict) else None
    if kind not in (FORMAT, LEGACY_FORMAT):
        raise CheckpointError(f"{path}: format is {kind!r:.60}, expected {FORMAT!r} (or {LEGACY_FORMAT!r})")
    checksummed = kind == FORMAT
    if checksummed and CHECKSUM not in manifest:
        raise CheckpointError(f"{path}: field {CHECKSUM!r}: missing (format {FORMAT!r} carries its checksum)")
    if checksummed:
        body = {key: value for key, value in manifest.items() if key != CHECKSUM}
        if manifest[CHECKSUM] != hashlib.sha256(canonical(body)).hexdigest():
            raise CheckpointError(f"{path}: contents differ from its own checksum (field {CHECKSUM!r}): damaged")
    try:
        check_schema(manifest, checksummed)
    except SchemaError as error:
        raise CheckpointError(f"{path}: {error}") from error
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
