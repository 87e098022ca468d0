"""The strict schema of ``manifest.json``: every field present, of its type and range, no other.

``check_schema(manifest, checksummed)`` raises ``SchemaError(field, message)``, where
``field`` is the path of the offending field (``row_sets[2].fields.slot.exp_avg.width``).
Beyond types and ranges it checks what ties the fields together:

- every row set names a table of ``tables`` and a rank below ``world_size``; no
  (table, role, rank) twice; the ranks of a (table, role) are ``{0}`` (a replicated
  table's rows, saved by rank 0) or every rank, and they all have the same fields;
- fields: ``ids`` (int64, width 1), ``weight`` (rows only; the table's dtype and row
  size), ``slot.<name>`` (a float or int64 dtype), ``meta.<name>`` (int64, width 1, one
  of the metadata columns recis keeps);
- ``files`` names exactly ``rank<r>.bin`` and ``rank<r>.pt`` for every rank;
- the fields of each rank's row sets tile its ``rank<r>.bin`` exactly: sorted by
  offset, each starts where the previous one ends (``count * width * itemsize``
  bytes), the first at 0, the last ending at the file's ``bytes``. So a changed count,
  width, dtype or offset never passes unnoticed, checksum or not.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any

import torch

from recis.checkpoint.row_file import dtype_of
from recis.checkpoint.saved_tables import META_PREFIX, OWNER_SLOTS, ROWS, SLOT_PREFIX
from recis.nn.eviction import LAST_SEEN, SIGHTINGS
from recis.nn.row_lifecycle import FILTER_STEP, GRAD_WINDOW

CHECKSUM = "sha256"
TOP_FIELDS = {
    "format",
    "sequence",
    "name",
    "created",
    "world_size",
    "mid_accumulation",
    "tables",
    "optimizers",
    "row_sets",
    "files",
}
TABLE_FIELDS = {"class", "embedding_shape", "dtype"}
ROW_SET_FIELDS = {"key", "role", "rank", "count", "fields"}
FIELD_FIELDS = {"dtype", "width", "offset"}
FILE_FIELDS = {"bytes", "crc32"}
ROW_DTYPES = {"float16", "bfloat16", "float32", "float64"}
SLOT_DTYPES = ROW_DTYPES | {"int64"}
META_COLUMNS = {LAST_SEEN, SIGHTINGS, FILTER_STEP, GRAD_WINDOW}
HEX_DIGEST = re.compile(r"[0-9a-f]{64}")


class SchemaError(ValueError):
    """A manifest field that is missing, unknown, of the wrong type or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"field {field!r}: {message}")
        self.field = field


def _exact_keys(value: Any, expected: set[str], field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SchemaError(field, f"must be an object, got {type(value).__name__}")
    missing, unknown = sorted(expected - set(value)), sorted(set(value) - expected)
    if missing:
        raise SchemaError(f"{field}.{missing[0]}" if field else missing[0], "missing")
    if unknown:
        raise SchemaError(f"{field}.{unknown[0]}" if field else unknown[0], "unknown field")
    return value


def _int(value: Any, field: str, low: int, high: int | None = None) -> int:
    """``value`` if an int (not a bool) in ``[low, high)``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise SchemaError(field, f"must be an int, got {value!r:.40}")
    if value < low or (high is not None and value >= high):
        raise SchemaError(field, f"must be in [{low}, {'inf' if high is None else high}), got {value}")
    return value


def _str(value: Any, field: str, allowed: set[str] | None = None) -> str:
    if not isinstance(value, str):
        raise SchemaError(field, f"must be a string, got {value!r:.40}")
    if allowed is not None and value not in allowed:
        raise SchemaError(field, f"must be one of {sorted(allowed)}, got {value!r:.40}")
    return value


def _check_header(manifest: dict[str, Any]) -> None:
    sequence = _int(manifest["sequence"], "sequence", 1)
    name = _str(manifest["name"], "name")
    stem = f"ckpt-{sequence:06d}"
    if name != stem and not name.startswith(f"{stem}-step"):
        raise SchemaError("name", f"{name!r:.40} does not name checkpoint {sequence} ({stem}[-step<n>])")
    created = manifest["created"]
    if isinstance(created, bool) or not isinstance(created, int | float) or not math.isfinite(created) or created < 0:
        raise SchemaError("created", f"must be a time in seconds >= 0, got {created!r:.40}")
    _int(manifest["world_size"], "world_size", 1)
    if not isinstance(manifest["mid_accumulation"], bool):
        raise SchemaError("mid_accumulation", f"must be true or false, got {manifest['mid_accumulation']!r:.40}")
    optimizers = manifest["optimizers"]
    if not isinstance(optimizers, list):
        raise SchemaError("optimizers", "must be a list of class names")
    for i, kind in enumerate(optimizers):
        if not _str(kind, f"optimizers[{i}]"):
            raise SchemaError(f"optimizers[{i}]", "must not be empty")


def _check_tables(tables: Any) -> None:
    if not isinstance(tables, dict):
        raise SchemaError("tables", "must be an object keyed by table")
    for key, table in tables.items():
        field = f"tables.{key}"
        _exact_keys(table, TABLE_FIELDS, field)
        if not _str(table["class"], f"{field}.class"):
            raise SchemaError(f"{field}.class", "must not be empty")
        shape = table["embedding_shape"]
        if not isinstance(shape, list) or not shape:
            raise SchemaError(f"{field}.embedding_shape", f"must be a non-empty list of ints, got {shape!r:.40}")
        for i, size in enumerate(shape):
            _int(size, f"{field}.embedding_shape[{i}]", 1)
        _str(table["dtype"], f"{field}.dtype", ROW_DTYPES)


def _check_field(name: str, field: Any, where: str, role: str, table: dict[str, Any]) -> None:
    """One field of a row set: its name, dtype and width."""
    _exact_keys(field, FIELD_FIELDS, where)
    _int(field["offset"], f"{where}.offset", 0)
    width = _int(field["width"], f"{where}.width", 1)
    if name == "ids" or name.startswith(META_PREFIX):
        if name.startswith(META_PREFIX):
            _str(name.removeprefix(META_PREFIX), where, META_COLUMNS)
        _str(field["dtype"], f"{where}.dtype", {"int64"})
        _int(width, f"{where}.width", 1, 2)
    elif name == "weight" and role == ROWS:
        _str(field["dtype"], f"{where}.dtype", {table["dtype"]})
        row_size = math.prod(table["embedding_shape"])
        _int(width, f"{where}.width", row_size, row_size + 1)
    elif name.startswith(SLOT_PREFIX) and name != SLOT_PREFIX:
        _str(field["dtype"], f"{where}.dtype", SLOT_DTYPES)
    else:
        raise SchemaError(where, f"unknown field of a {role!r} row set")


def _check_row_set(i: int, row_set: Any, tables: dict[str, Any], world_size: int) -> None:
    field = f"row_sets[{i}]"
    _exact_keys(row_set, ROW_SET_FIELDS, field)
    key = _str(row_set["key"], f"{field}.key", set(tables))
    role = _str(row_set["role"], f"{field}.role", {ROWS, OWNER_SLOTS})
    _int(row_set["rank"], f"{field}.rank", 0, world_size)
    _int(row_set["count"], f"{field}.count", 0)
    fields = row_set["fields"]
    if not isinstance(fields, dict):
        raise SchemaError(f"{field}.fields", "must be an object keyed by field name")
    required = {"ids", "weight"} if role == ROWS else {"ids"}
    for name in sorted(required - set(fields)):
        raise SchemaError(f"{field}.fields.{name}", "missing")
    for name, described in fields.items():
        _check_field(name, described, f"{field}.fields.{name}", role, tables[key])


def _check_groups(row_sets: list[dict[str, Any]], tables: dict[str, Any], world_size: int) -> None:
    """Row sets of one (table, role): a table's rows saved by rank 0 or by every rank, owner slots by
    every rank, all with the same fields; every table has its rows."""
    groups: dict[tuple[str, str], list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    for i, row_set in enumerate(row_sets):
        groups[row_set["key"], row_set["role"]].append((i, row_set))
    for key in tables:
        if (key, ROWS) not in groups:
            raise SchemaError("row_sets", f"no {ROWS!r} row set for table {key!r}")
    for (key, role), members in groups.items():
        ranks = sorted(row_set["rank"] for _, row_set in members)
        if ranks != list(range(world_size)) and (role != ROWS or ranks != [0]):
            raise SchemaError(f"row_sets[{members[0][0]}].rank", f"table {key!r} ({role}) saved by ranks {ranks}")
        layout = {name: (f["dtype"], f["width"]) for name, f in members[0][1]["fields"].items()}
        for i, row_set in members[1:]:
            if {name: (f["dtype"], f["width"]) for name, f in row_set["fields"].items()} != layout:
                raise SchemaError(f"row_sets[{i}].fields", f"differ from those of row_sets[{members[0][0]}]")


def _check_distinct(row_sets: list[dict[str, Any]]) -> None:
    seen = set()
    for i, row_set in enumerate(row_sets):
        identity = (row_set["key"], row_set["role"], row_set["rank"])
        if identity in seen:
            raise SchemaError(f"row_sets[{i}]", "a second row set for table {!r}, {}, rank {}".format(*identity))
        seen.add(identity)


def _check_files(files: Any, world_size: int) -> None:
    expected = {f"rank{rank:05d}.{suffix}" for rank in range(world_size) for suffix in ("bin", "pt")}
    _exact_keys(files, expected, "files")
    for name, described in files.items():
        _exact_keys(described, FILE_FIELDS, f"files.{name}")
        _int(described["bytes"], f"files.{name}.bytes", 0)
        _int(described["crc32"], f"files.{name}.crc32", 0, 2**32)


def _field_bytes(row_set: dict[str, Any], field: dict[str, Any]) -> int:
    return row_set["count"] * field["width"] * torch.empty((), dtype=dtype_of(field["dtype"])).element_size()


def _check_tiling(row_sets: list[dict[str, Any]], files: dict[str, Any], world_size: int) -> None:
    """The fields of each rank's row sets cover its ``.bin`` file exactly, without gap or overlap."""
    extents: dict[int, list[tuple[int, int, str]]] = defaultdict(list)
    for i, row_set in enumerate(row_sets):
        for name, field in row_set["fields"].items():
            extents[row_set["rank"]].append(
                (field["offset"], _field_bytes(row_set, field), f"row_sets[{i}].fields.{name}")
            )
    for rank in range(world_size):
        end = 0
        for offset, size, where in sorted(extents[rank]):
            if offset != end:
                raise SchemaError(f"{where}.offset", f"is {offset}; the fields before it end at byte {end}")
            end += size
        bin_file = f"rank{rank:05d}.bin"
        if end != files[bin_file]["bytes"]:
            raise SchemaError(f"files.{bin_file}.bytes", f"is {files[bin_file]['bytes']}; its fields end at {end}")


def check_schema(manifest: Any, checksummed: bool) -> None:
    """Raise ``SchemaError`` naming the first field that breaks the schema (module docstring).

    ``checksummed``: the manifest must hold ``sha256`` (a lowercase hex digest); else it must not.
    """
    _exact_keys(manifest, TOP_FIELDS | ({CHECKSUM} if checksummed else set()), "")
    if checksummed and not (isinstance(manifest[CHECKSUM], str) and HEX_DIGEST.fullmatch(manifest[CHECKSUM])):
        raise SchemaError(CHECKSUM, "must be 64 lowercase hex digits")
    _check_header(manifest)
    _check_tables(manifest["tables"])
    world_size, row_sets = manifest["world_size"], manifest["row_sets"]
    if not isinstance(row_sets, list):
        raise SchemaError("row_sets", "must be a list")
    for i, row_set in enumerate(row_sets):
        _check_row_set(i, row_set, manifest["tables"], world_size)
    _check_distinct(row_sets)
    _check_groups(row_sets, manifest["tables"], world_size)
    _check_files(manifest["files"], world_size)
    _check_tiling(row_sets, manifest["files"], world_size)
