"""The layering of docs/design.md, read from the source: app ← worker → tuneqdm_core. The core never
imports the service; app never imports the ML stack; the client (tuneqdm_client) imports none of
them (tests/api/test_layering.py checks the same at run time, in a fresh interpreter)."""

from __future__ import annotations

import ast
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
    # The worker shares app's FastAPI-free modules only.
    "worker": {"fastapi", "starlette", "uvicorn"},
    # The client installs on its own with httpx only (docs/client.md).
    "tuneqdm_client": {
        "app",
        "worker",
        "tuneqdm_core",
        "torch",
        "fastapi",
        "starlette",
        "sqlalchemy",
        "celery",
        "pydantic",
        "PIL",
    },
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
