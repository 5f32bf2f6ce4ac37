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


# server/'s packages, lowest first: a module may import from a lower rank or its own package, never upward
# and never sideways (the model's forward knows nothing of adapters; the adapter machinery nothing of it).
SERVER_LAYERS = {"common": 0, "model": 1, "lora": 1, "engine": 2, "demo": 3, "state": 4, "api": 5, "cluster": 6, "cli": 7}


def server_group(module: str) -> str:
    """'server.lora.ops.torch_cpu' -> 'lora'; 'server.state' -> 'state'."""
    return module.split(".")[1]


def server_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "server" else [f"server.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found.update(n for n in names if n.startswith("server.") and n.count(".") >= 1)
    return found


def layer_violations(root: Path) -> list[str]:
    offenders = []
    for f in sorted((root / "server").rglob("*.py")):
        rel = f.relative_to(root).with_suffix("")
        if rel.name == "__init__" and len(rel.parts) == 2:
            continue
        group = server_group(".".join(rel.parts))
        assert group in SERVER_LAYERS, f"{rel}: add its package to SERVER_LAYERS"
        for target in server_imports(f):
            other = server_group(target)
            if other != group and SERVER_LAYERS[other] >= SERVER_LAYERS[group]:
                offenders.append(f"{rel} ({group}) imports {target} ({other})")
    return offenders


def test_server_packages_import_downward_only():
    offenders = layer_violations(ROOT)
    assert not offenders, "\n".join(offenders)


def test_the_layer_check_sees_upward_and_sideways_imports(tmp_path):
    (tmp_path / "server" / "lora").mkdir(parents=True)
    (tmp_path / "server" / "lora" / "x.py").write_text(
        "from server.lora.plan import BatchPlan\ndef g():\n    from server import state\n"
        "import server.model.runner\n")
    assert sorted(layer_violations(tmp_path)) == ["server/lora/x (lora) imports server.model.runner (model)",
                                                  "server/lora/x (lora) imports server.state (state)"]
