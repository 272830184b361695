"""pyproject.toml: the linters check the Python version the package says it supports."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+; the check is the same on any version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())


def test_ruff_and_mypy_target_the_oldest_supported_python() -> None:
    found = re.fullmatch(r">=\s*3\.(\d+)", PYPROJECT["project"]["requires-python"])
    assert found, "requires-python should read '>=3.N'"
    minor = int(found.group(1))
    assert PYPROJECT["tool"]["ruff"]["target-version"] == f"py3{minor}"
    assert PYPROJECT["tool"]["mypy"]["python_version"] == f"3.{minor}"


def _requires(name: str, seen: set[str]) -> set[str]:
    """`name` and every distribution it needs, as installed here (environment markers and
    extras not requested are left out)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    key = re.sub(r"[-_.]+", "-", name).lower()
    if key in seen:
        return seen
    seen.add(key)
    try:
        requires = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return seen
    for line in requires:
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate({"extra": ""}):
            _requires(req.name, seen)
    return seen


def test_the_api_extra_pulls_no_torch() -> None:
    """The API image installs `.[api]` only and must carry no torch (docs/design.md): not even
    through a dependency of a dependency, which would pull a multi-GB CUDA build."""
    from packaging.requirements import Requirement

    needed: set[str] = set()
    for line in PYPROJECT["project"]["optional-dependencies"]["api"]:
        _requires(Requirement(line).name, needed)
    assert "fastapi" in needed and "celery" in needed  # the walk sees the installed packages
    assert "torch" not in needed, sorted(needed)
