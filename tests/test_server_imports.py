"""How ``server_stub``'s modules depend on each other, read from their source.

Every import counts, also those under ``TYPE_CHECKING`` and inside functions.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Dict, Set

import pytest

import server_stub

PACKAGE = Path(server_stub.__file__).resolve().parent


def _imports_of(path: Path) -> Set[str]:
    """The package's modules that ``path`` imports (``"_app"``, ``"_storage"`` ...)."""
    imported: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                imported.add(node.module.split(".")[0])
            elif node.level == 1:
                imported.update(alias.name for alias in node.names)
            elif node.module and node.module.split(".")[0] == "server_stub":
                parts = node.module.split(".")
                imported.update(parts[1:2] or [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "server_stub" and len(parts) > 1:
                    imported.add(parts[1])
    return imported


GRAPH: Dict[str, Set[str]] = {path.stem: _imports_of(path) for path in sorted(PACKAGE.glob("*.py"))}


def _reachable(start: str) -> Set[str]:
    seen: Set[str] = set()
    pending = [start]
    while pending:
        for imported in GRAPH.get(pending.pop(), set()) - seen:
            seen.add(imported)
            pending.append(imported)
    return seen


def test_the_graph_was_read() -> None:
    assert GRAPH["_app"] >= {"_storage", "_policy"}
    assert "_http" in GRAPH["__main__"]


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_no_module_imports_itself_through_others(module: str) -> None:
    assert module not in _reachable(module)


def test_the_command_line_does_not_load_the_test_harness() -> None:
    assert _reachable("__main__").isdisjoint({"_harness", "pytest_plugin", "_pgtemp"})


def test_what_every_store_shares_sits_at_the_bottom() -> None:
    assert GRAPH["_storage"] == GRAPH["_group_commit"] == set()
    # The rollups are shared by both stores, written against _storage's Runner.
    assert GRAPH["_rollups"] == {"_storage"}
    assert GRAPH["_sqlite"] == GRAPH["_postgres"] == {"_storage", "_rollups", "_group_commit"}


def test_the_operator_side_sits_beside_the_stores_not_below_them() -> None:
    assert GRAPH["_access"] == set()
    assert GRAPH["_openapi"] == set()
    assert GRAPH["_queries"] == {"_storage", "_rollups"}
    assert GRAPH["_policy"] == {"_storage"}
    assert GRAPH["_policy_cli"] == {"_policy"}


def test_importing_the_package_does_not_load_the_test_harness() -> None:
    """``python -m server_stub`` imports the package first: the harness waits for ``serve``."""
    probe = ("import sys, server_stub; before = 'server_stub._harness' in sys.modules; "
             "server_stub.serve; print(before, 'server_stub._harness' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout.split()
    assert out == ["False", "True"]  # not at import; loaded by the first use of ``serve``
