"""The Kubernetes API is reached through one narrow module (DESIGN.md, "Catalog store")."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "csi_driver"
ALLOWED = {PACKAGE / "kube" / "api.py"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_only_kube_api_imports_the_kubernetes_client() -> None:
    sources = [p for p in PACKAGE.rglob("*.py") if "gen" not in p.relative_to(PACKAGE).parts]
    assert len(sources) > 50
    importers = {
        p for p in sources if any(m.split(".")[0] == "kubernetes" for m in imported_modules(p))
    }
    assert importers == ALLOWED, sorted(str(p.relative_to(PACKAGE)) for p in importers)


def test_the_pure_kube_modules_import_only_the_core() -> None:
    for name in ("events.py", "nodes.py"):
        ferry = {m for m in imported_modules(PACKAGE / "kube" / name) if m.startswith("csi_driver")}
        assert all(m.startswith(("csi_driver.core", "csi_driver.kube")) for m in ferry), ferry
