"""Real processes for the service tests and the load benchmark (benchmarks/load.py): uvicorn,
Celery workers, redis-server, the admin CLI. pytest is imported only where a test skips."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import httpx

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
    import pytest
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
        self._terminated = False
        self._log: IO[bytes] = self.log_path.open("wb")
        self.popen = subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(timeout=30)

    def terminate(self) -> None:
        """Ask it to stop (SIGTERM) without waiting; `stop` then waits."""
        if self.alive() and not self._terminated:
            self.popen.terminate()
            self._terminated = True

    def stop(self, timeout: float = 20) -> int:
        if self.alive():
            self.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=30)
        self._log.close()
        return int(self.popen.returncode)


def start_worker(env: dict[str, str], logs: Path, name: str, prefix: Sequence[str] = ()) -> Proc:
    """A `--pool=solo` Celery worker on every queue; `prefix` runs it under another command
    (e.g. `faketime`)."""
    return Proc(
        name,
        [
            *prefix,
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


def start_api(env: dict[str, str], logs: Path, port: int, name: str = "api") -> Proc:
    return Proc(
        name,
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


def answers_ready(client: httpx.Client) -> bool:
    """Whether the API behind `client` answers GET /readyz with 200 (False while it starts)."""
    try:
        return client.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False


def wait_final(client: httpx.Client, url: str, timeout: float, procs: list[Proc]) -> dict[str, Any]:
    """The job at `url` (GET) once it is succeeded, failed or canceled."""
    state: dict[str, Any] = {}

    def final() -> bool:
        state.update(client.get(url).raise_for_status().json())
        return state["status"] in ("succeeded", "failed", "canceled")

    wait_for(url, final, timeout, procs)
    return state


def post_finetune(
    client: httpx.Client, params: dict[str, Any], *, photos: int = 3, **form: str
) -> httpx.Response:
    """POST /v1/finetunes: `photos` generated subject photos of "a photo of sks dog", `params`
    and any other form fields (base, webhook_url)."""
    from tests.worker.conftest import photo_png  # test code only (it imports pytest)

    return client.post(
        "/v1/finetunes",
        files=[("images", (f"{i}.png", photo_png(i), "image/png")) for i in range(photos)],
        data={"instance_prompt": "a photo of sks dog", "params": json.dumps(params), **form},
    )


def admin(env: dict[str, str], *args: str) -> str:
    """Run the admin CLI (`tuneqdm-admin`) against the service's settings; its stdout."""
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout


def create_key(env: dict[str, str], tenant: str) -> dict[str, str]:
    """A new API key for `tenant` (created if new): the CLI's fields, e.g. "api key" and
    "webhook signing secret"."""
    out = admin(env, "keys", "create", "--tenant", tenant)
    return dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)


class Service:
    """The API (uvicorn) and `workers` Celery worker processes on one database, broker and
    storage (all in `env`). Workers are named w0, w1, ... (their logs: w0.log, ...)."""

    def __init__(self, env: dict[str, str], logs: Path, workers: int = 1) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.api = start_api(env, logs, self.port)
        self.workers = [start_worker(env, logs, f"w{i}") for i in range(workers)]

    @property
    def procs(self) -> list[Proc]:
        return [self.api, *self.workers]

    def client(self, key: str, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"}
        return httpx.Client(base_url=self.base_url, headers=headers, **kwargs)

    def wait_ready(self, key: str, timeout: float = 120) -> None:
        """Until the API is ready and every worker has registered (GET /v1/bases lists it),
        i.e. each worker listens on the queues and a batch submitted now reaches all of them."""
        with self.client(key, timeout=5) as client:

            def registered() -> bool:
                bases = client.get("/v1/bases").raise_for_status().json()["data"]
                names = {w["worker"] for b in bases for w in b["workers"]}
                return len(names) >= len(self.workers)

            wait_for("the API", lambda: answers_ready(client), timeout, self.procs)
            wait_for(f"{len(self.workers)} worker(s) registered", registered, timeout, self.procs)

    def stop(self) -> None:
        for proc in self.procs:  # all at once: each may take seconds to shut down
            proc.terminate()
        for proc in self.procs:
            proc.stop()

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class TcpProxy:
    """A TCP proxy on loopback to `target_port`, switched off (every open connection cut, new
    ones closed at once, as a network partition looks to a client) and on again."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self.enabled = threading.Event()
        self.enabled.set()
        self._open: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            if not self.enabled.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def off(self) -> None:
        self.enabled.clear()
        with self._lock:
            for s in self._open:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
            self._open.clear()

    def on(self) -> None:
        self.enabled.set()

    def close(self) -> None:
        self.off()
        self.listener.close()


class RedisServer:
    """A private redis-server on a free port, without persistence: a restart loses every
    message, as a broker restarted without its data does."""

    def __init__(self, logs: Path) -> None:
        self.port = free_port()
        self.logs = logs
        self.proc: Proc | None = None
        self.starts = 0
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.starts += 1
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.logs)]
        self.proc = Proc(f"redis-{self.starts}", args, dict(os.environ), self.logs)
        wait_for("redis-server", self._answers, 30, [self.proc])

    def _answers(self) -> bool:
        import redis

        client = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False
        finally:
            client.close()

    def restart(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.stop()
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
