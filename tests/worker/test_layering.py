"""Importing the worker touches neither torch nor CUDA (the model loads on the first task),
nor FastAPI (the worker shares app's FastAPI-free modules only)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_worker_import_loads_no_ml_stack_and_no_fastapi(tmp_path: Path) -> None:
    probe = (
        "import json, sys\n"
        "import worker.celery_app, worker.tasks, worker.embedded, worker.bases, worker.bounds\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "TUNEQDM_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    loaded = set(json.loads(out))
    assert "celery" in loaded
    assert not loaded & {"torch", "diffusers", "transformers", "tuneqdm_core", "fastapi"}
