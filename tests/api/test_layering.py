"""The API process never loads the ML stack, and the shared modules never load FastAPI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
import {modules}
print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))
"""

SHARED = "app.settings, app.db, app.models, app.storage, app.security, app.queue, " + (
    "app.schemas, app.images, app.webhooks, app.services.finetunes, app.services.generations, "
    "app.services.adapters, app.services.keys, app.services.bases, app.bases, app.budget, app.cli"
)


def _loaded(modules: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(modules=modules)],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return set(json.loads(out))


def test_api_does_not_import_the_ml_stack() -> None:
    loaded = _loaded("app.main, app.routes.finetunes; app.main.create_app")
    assert not loaded & {"torch", "diffusers", "transformers", "tuneqdm_core", "worker"}


def test_shared_modules_do_not_import_fastapi() -> None:
    loaded = _loaded(SHARED)
    assert not loaded & {"fastapi", "starlette", "torch", "tuneqdm_core"}


def test_client_loads_only_httpx() -> None:
    loaded = _loaded("tuneqdm_client")
    assert "httpx" in loaded
    assert not loaded & {"app", "worker", "tuneqdm_core", "torch", "fastapi", "pydantic", "PIL"}
