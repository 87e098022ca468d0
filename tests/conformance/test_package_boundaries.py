"""Packages use each other's public API only: no ``other._private`` and no import of a private name.

Checked statically over recis/, benchmarks/ and examples/. ``self._x``, ``cls._x`` and
``super()._x`` are the object's own business; private names of torch (``torch._foreach_*``,
``Optimizer._group_tensors_by_device_and_dtype``) are torch's, not ours, and allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CHECKED = sorted(path for folder in ("recis", "benchmarks", "examples") for path in (ROOT / folder).rglob("*.py"))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _torch_names(tree: ast.Module) -> set[str]:
    """Names this module bound to torch modules or objects (``import torch``, ``from torch.optim import X``)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {
                (alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name.startswith("torch")
            }
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            names |= {alias.asname or alias.name for alias in node.names}
    return names


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def _own(value: ast.expr) -> bool:
    if isinstance(value, ast.Name):
        return value.id in ("self", "cls")
    return isinstance(value, ast.Call) and isinstance(value.func, ast.Name) and value.func.id == "super"


def private_reaches(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    torch_names = _torch_names(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr) and not _own(node.value):
            root = _root(node.value)
            if not (isinstance(root, ast.Name) and root.id in torch_names):
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("recis"):
            found += [
                f"{path}:{node.lineno}: imports {node.module}.{alias.name}"
                for alias in node.names
                if _is_private(alias.name)
            ]
    return found


def test_the_checked_tree_is_not_empty():
    assert any(path.name == "hashtable.py" for path in CHECKED)


@pytest.mark.parametrize("path", CHECKED, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_code_reaches_a_private_member_of_another_object(path):
    assert private_reaches(path) == []


def test_the_check_catches_a_reach_into_another_objects_private_member(tmp_path):
    sample = tmp_path / "probe.py"
    sample.write_text(
        "import torch\n"
        "from recis.ops.id_map import _helper\n"
        "def f(table):\n"
        "    torch._foreach_add_\n"
        "    return table._store\n"
    )
    assert [finding.split(": ", 1)[1] for finding in private_reaches(sample)] == [
        "imports recis.ops.id_map._helper",
        "table._store",
    ]
