"""Imports run one way: trainer -> adapters_store <- server (DESIGN.md section 1), checked on the AST."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {"server": {"trainer"}, "trainer": {"server"}, "adapters_store": {"server", "trainer"}}


def imported_packages(path: Path) -> set[str]:
    """Top-level package of every import in the file, including those inside functions."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in (
                "import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            found.add(str(node.args[0].value).split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_import_direction(package):
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no python files under {package}/"
    offenders = [f"{f.relative_to(ROOT)} imports {sorted(imported_packages(f) & FORBIDDEN[package])}"
                 for f in files if imported_packages(f) & FORBIDDEN[package]]
    assert not offenders, "\n".join(offenders)


def test_the_checker_sees_every_import_form(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import server.engine\nfrom trainer import loop\n"
                 "def g():\n    import importlib\n    importlib.import_module('server.api.app')\n")
    assert {"server", "trainer", "importlib"} <= imported_packages(f)
