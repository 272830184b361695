"""The embedded service (`make run`): API and one worker on this machine, no servers to install.

Everything comes from app.settings' embedded defaults: the SQLite registry, Celery over kombu's
SQLAlchemy transport on SQLite, files under ./var, the built-in model (models/fashion-sd), the
CPU. This process migrates the registry (and builds a random tiny model on first start where
the built-in one is missing), creates an API key on first start (kept in
<data_dir>/embedded-key, mode 0600, and printed again on every later start while it is valid
and of the same tenant; `--new-key` mints another), starts uvicorn and a `--pool=solo` Celery
worker, waits until the worker has loaded the base (so a user's first fine-tune starts
training at once instead of first importing torch and loading the model), prints the URL and
the key, and stops both on Ctrl-C or SIGTERM (or when either of them exits).

    python -m worker.embedded [--host 127.0.0.1] [--port 8000] [--tenant local] [--new-key]

`--host 0.0.0.0` (`make run HOST=0.0.0.0`) listens on every interface, for other machines.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

from alembic import command
from alembic.config import Config

from app.bases import register
from app.db import engine_from_settings, make_sessionmaker, session_scope
from app.errors import Unauthorized
from app.services import keys
from app.services.webhook_secrets import current_secret
from app.settings import Settings, get_settings
from worker.bases import folder_info
from worker.jobs import STALLED_EXIT

ROOT = Path(__file__).resolve().parent.parent
API_COMMAND = [sys.executable, "-m", "uvicorn", "--factory", "app.main:create_app"]
# One worker for every queue; gossip, mingle and heartbeats need broadcast, which the SQLite
# broker does not carry.
WORKER_COMMAND = [
    *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool=solo"),
    *("-Q", "finetune,generate,webhooks", "-n", "embedded@%h", "--loglevel=INFO"),
    *("--without-gossip", "--without-mingle", "--without-heartbeat"),
]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker.embedded", description=__doc__)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (0.0.0.0: every interface, reachable from other machines)",
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--tenant", default="local", help="tenant of the printed API key")
    parser.add_argument(
        "--new-key",
        action="store_true",
        help="mint a new API key instead of reusing the stored one (the old one stays valid "
        "until revoked: tuneqdm-admin keys revoke)",
    )
    return parser


KEY_FILE = "embedded-key"
# The worker's ready file under the data dir, unless TUNEQDM_WORKER_READY_FILE names one.
READY_FILE = "worker.ready"
# How long the launcher waits for the worker's first base load before it prints the URL
# anyway (a random tiny model or a large TUNEQDM_MODEL on a slow disk can take longer).
LOAD_WAIT_S = 300.0


def _stored_key(session: Any, path: Path, tenant_name: str) -> str | None:
    """The key kept at ``path`` when it still authenticates as ``tenant_name``."""
    if not path.is_file():
        return None
    key = path.read_text().strip()
    try:
        tenant = keys.authenticate(session=session, key=key)
    except Unauthorized:
        return None  # revoked, or the registry was deleted
    return key if tenant.name == tenant_name else None


def _store_key(path: Path, key: str) -> None:
    # A secret: readable by its owner only (0600), written whole or not at all.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.replace(tmp, path)


def _say(text: str) -> None:
    print(text, flush=True)


def prepare(settings: Settings, tenant_name: str, new_key: bool = False) -> tuple[str, str]:
    """Migrate, build the model if needed, reuse the stored key or create one; returns (api
    key, webhook secret)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.attributes["database_url"] = settings.resolved_database_url
    command.upgrade(cfg, "head")
    if not settings.model and not (settings.default_model_dir / "model_index.json").is_file():
        _say(f"building the tiny model in {settings.default_model_dir} (first start only)")
        from worker.runtime import ensure_default_model

        ensure_default_model(settings)
    engine = engine_from_settings(settings)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            # Registered before the API serves, so GET /v1/bases lists the base at once (the
            # worker adds itself and the fingerprint when it starts and loads the model).
            info = folder_info(settings)
            if info is not None:
                register(session, info)
            tenant = keys.get_or_create_tenant(session=session, name=tenant_name)
            key_path = settings.data_dir / KEY_FILE
            stored = None if new_key else _stored_key(session, key_path, tenant_name)
            if stored is None:
                _, key = keys.create_key(session=session, tenant=tenant)
                session.flush()
                _store_key(key_path, key)
            else:
                key = stored
            secret = current_secret(settings, tenant)
    finally:
        engine.dispose()
    return key, secret


def _wait_healthy(url: str, api: subprocess.Popen[bytes], timeout: float = 120) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and api.poll() is None:
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            time.sleep(0.3)
    return False


def _worker_env(settings: Settings) -> tuple[dict[str, str], Path]:
    """The worker's environment with a ready file (its own TUNEQDM_WORKER_READY_FILE where
    set): the worker then loads the base as soon as it starts and creates the file when it is
    loaded (worker/bases.py). A file left by an earlier run is removed first. The built-in
    model is kept resident and run on one thread unless TUNEQDM_STORAGE_MODE and
    TUNEQDM_TORCH_THREADS say otherwise."""
    ready = settings.worker_ready_file or settings.data_dir / READY_FILE
    ready = ready.resolve()
    ready.unlink(missing_ok=True)
    env = {**os.environ, "TUNEQDM_WORKER_READY_FILE": str(ready)}
    if not settings.model:
        # The built-in model's dequantized copy is 18 MB and saves every pass its
        # dequantization; and its layers are too small for two threads to share: one thread
        # steps in 0.13 s where two take 0.21 on a 2-core CPU (docs/benchmarks.md).
        env.setdefault("TUNEQDM_STORAGE_MODE", "resident")
        env.setdefault("TUNEQDM_TORCH_THREADS", "1")
    return env, ready


def _wait_loaded(ready: Path, worker: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and worker.poll() is None:
        if ready.is_file():
            return True
        time.sleep(0.2)
    return False


def _stop(children: list[subprocess.Popen[bytes]], timeout: float = 15) -> None:
    for child in children:
        if child.poll() is None:
            child.terminate()
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            # A fine-tune stopped here resumes from its checkpoint on the next start.
            child.kill()
            child.wait()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    settings = get_settings()
    key, secret = prepare(settings, args.tenant, new_key=args.new_key)
    url = f"http://{args.host}:{args.port}"
    # Every interface: others reach it by this machine's name (or address), not 0.0.0.0.
    shown = f"http://{socket.getfqdn()}:{args.port}" if args.host in ("0.0.0.0", "::") else url
    # Own sessions: Ctrl-C reaches only this process, which then stops the children in order.
    api = subprocess.Popen(
        [*API_COMMAND, "--host", args.host, "--port", str(args.port)], start_new_session=True
    )
    worker_env, ready = _worker_env(settings)
    worker = subprocess.Popen(WORKER_COMMAND, start_new_session=True, env=worker_env)
    children = [api, worker]
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    if not _wait_healthy(url, api):
        _say("error: the API did not start; see its output above")
        _stop(children)
        return 1
    _say("loading the model in the worker…")
    if not _wait_loaded(ready, worker, LOAD_WAIT_S):
        if worker.poll() is not None:
            _say(f"error: the worker exited with code {worker.returncode}; see its output above")
            _stop(children)
            return 1
        # The API takes jobs anyway; the worker starts them once it has the model.
        _say(f"the worker is still loading the model after {LOAD_WAIT_S:.0f} s; going on")
    _say(
        "\n".join(
            [
                "",
                "tuneqdm is running (embedded mode: SQLite, local files, built-in model, CPU)",
                f"URL: {shown}",
                f"API key: {key}",
                f"Webhook signing secret: {secret}",
                f"Docs: {shown}/docs",
                "Ctrl-C stops the API and the worker.",
                "",
            ]
        )
    )
    code = 0
    while not stop.wait(0.5):
        if worker.poll() == STALLED_EXIT:
            # Its job made no progress for TUNEQDM_PROGRESS_TIMEOUT_S and was given back.
            _say("the worker gave up a stalled job; starting it again")
            worker = subprocess.Popen(WORKER_COMMAND, start_new_session=True, env=worker_env)
            children = [api, worker]
        exited = [c for c in children if c.poll() is not None]
        if exited:
            _say(f"error: a service process exited with code {exited[0].returncode}; stopping")
            code = 1
            break
    _stop(children)
    return code


if __name__ == "__main__":
    sys.exit(main())
