"""Real processes for the service tests: uvicorn, Celery workers, the embedded launcher."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import pytest

ROOT = Path(__file__).resolve().parents[2]
REDIS = os.environ.get("TEST_REDIS_SERVER", "127.0.0.1:6379")
# Own Redis databases per checkout (TEST_REDIS_DB), so two test runs on one machine do not
# consume each other's messages.
REDIS_DB = int(os.environ.get("TEST_REDIS_DB", "14"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_redis() -> str:
    """The test broker URL (a database of its own, emptied), or skip when Redis is not there."""
    import redis

    host, port = REDIS.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), db=REDIS_DB, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.skip(f"Redis at {REDIS} not reachable: {exc}")
    finally:
        client.close()
    return f"redis://{REDIS}/{REDIS_DB}"


def flush_redis() -> None:
    import redis

    host, port = REDIS.rsplit(":", 1)
    client = redis.Redis(host=host, port=int(port), db=REDIS_DB, socket_connect_timeout=3)
    try:
        client.flushdb()
    finally:
        client.close()


def service_env(**settings: object) -> dict[str, str]:
    """A clean environment: no TUNEQDM_* from the developer's shell, this checkout first."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEQDM_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"TUNEQDM_{k.upper()}": str(v) for k, v in settings.items()})
    return env


class Proc:
    """A child process with its output in a log file (shown when a test fails)."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name = name
        self.log_path = logs / f"{name}.log"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        self._log.close()
        return int(self.popen.returncode)


def start_worker(env: dict[str, str], logs: Path, name: str) -> Proc:
    return Proc(
        name,
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "worker.celery_app",
            "worker",
            "--pool=solo",
            "-Q",
            "finetune,generate,webhooks",
            "-n",
            f"{name}@%h",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
        ],
        env,
        logs,
    )


def start_api(env: dict[str, str], logs: Path, port: int) -> Proc:
    return Proc(
        "api",
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--factory",
            "app.main:create_app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        env,
        logs,
    )


def wait_for(what: str, check: Callable[[], bool], timeout: float, procs: list[Proc]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        for proc in procs:
            if not proc.alive():
                raise AssertionError(f"{proc.name} exited while waiting for {what}:\n{proc.log()}")
        time.sleep(0.2)
    logs = "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in procs)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs}")
