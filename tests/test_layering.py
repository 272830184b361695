"""DESIGN.md layering: app ← worker → tuneqdm_core; the core never imports the service, and
the API process never loads the ML stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "tuneqdm_core": {
        "fastapi",
        "starlette",
        "celery",
        "kombu",
        "sqlalchemy",
        "alembic",
        "app",
        "worker",
    },
    "app": {"torch", "diffusers", "transformers", "safetensors", "tuneqdm_core", "worker"},
}


def _imported_roots(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_what_its_layer_allows(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no Python files"
    offenders = {
        str(path.relative_to(ROOT)): sorted(_imported_roots(path) & FORBIDDEN[package])
        for path in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_importing_the_api_package_loads_no_ml_stack() -> None:
    modules = [p.stem for p in (ROOT / "app").glob("*.py") if p.stem != "__main__"]
    code = (
        "import importlib, sys\n"
        f"for name in {sorted(modules)!r}:\n"
        "    importlib.import_module('app' if name == '__init__' else 'app.' + name)\n"
        "loaded = sorted(m for m in ('torch', 'diffusers', 'transformers', 'tuneqdm_core') "
        "if m in sys.modules)\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
