"""Deletion wins every race with a training worker, on both storage backends (docs/workers.md,
"Deletion"): real uvicorn, a real Celery worker, PostgreSQL, Redis and, for S3, SeaweedFS.

Per backend, four fine-tunes train in one worker's co-training group: one is deleted
mid-training (no kill), one purged with its tenant mid-training, one deleted and its worker then
SIGKILLed, one deleted after that SIGKILL. Once the DELETE or purge returned and the worker took
one more step (or a new worker started after the kill), no stored object of the job and no
local copy in the worker's staging folder remain.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.settings import Settings
from app.storage import Storage, storage_from_settings
from tests.service.procs import (
    Proc,
    RedisServer,
    admin,
    answers_ready,
    create_key,
    free_port,
    post_finetune,
    service_env,
    start_api,
    start_worker,
    wait_for,
)

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

# Long enough to be mid-training whenever it is deleted; a checkpoint after every step, so a
# worker always has one to upload next.
TRAINING = {"steps": 5000, "resolution": 32, "checkpoint_every": 1}


@dataclass
class Stack:
    api_env: dict[str, str]
    worker_env: dict[str, str]
    storage: Storage
    staging: Path | None  # the worker's own folder of local copies (S3 only)
    logs: Path
    api: Proc
    worker: Proc
    client: httpx.Client
    started: int = 0

    def start_worker(self) -> None:
        self.started += 1
        self.worker = start_worker(self.worker_env, self.logs, f"w{self.started}")

    def kill_worker(self) -> None:
        self.worker.kill()
        self.worker.stop()

    def submit(self, key: str, seed: int) -> str:
        client = httpx.Client(
            base_url=str(self.client.base_url), headers={"Authorization": f"Bearer {key}"}
        )
        r = post_finetune(client, {**TRAINING, "seed": seed})
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def step(self, key: str, job_id: str) -> int:
        """The job's progress step (-1 once it is no longer running)."""
        auth = {"Authorization": f"Bearer {key}"}
        job = self.client.get(f"/v1/finetunes/{job_id}", headers=auth).raise_for_status().json()
        return int(job["progress"]["step"]) if job["status"] == "running" else -1

    def training(self, jobs: dict[str, tuple[str, str]]) -> None:
        """Until every job (id → (key, tenant id)) has trained a few steps in the worker's
        co-training group and, with S3, stored a checkpoint."""

        def trained() -> bool:
            return all(
                self.step(key, job_id) >= 2
                and (self.staging is None or bool(self.checkpoints(tenant_id, job_id)))
                for job_id, (key, tenant_id) in jobs.items()
            )

        wait_for(f"{sorted(jobs)} to train", trained, 240, [self.api, self.worker])

    def one_step_later(self, key: str, job_id: str) -> None:
        """Until `job_id`, in the same group as a deleted job, has trained two more steps: the
        worker has then taken the step after the deletion, and ended the deleted member."""
        now = self.step(key, job_id)
        wait_for("the next steps", lambda: self.step(key, job_id) >= now + 2, 120, [self.worker])

    def checkpoints(self, tenant_id: str, job_id: str) -> list[str]:
        prefix = f"tenants/{tenant_id}/finetunes/{job_id}/checkpoint"
        return [o.key for o in self.storage.list(prefix)]

    def left(self, tenant_id: str, job_id: str) -> list[str]:
        """Stored objects and staged copies of the job (its photos, checkpoint, progress
        images, adapter)."""
        name = job_id.removeprefix("ft_")
        stored = [o.key for o in self.storage.list(f"tenants/{tenant_id}") if name in o.key]
        staged = []
        if self.staging is not None and self.staging.is_dir():
            staged = [str(p) for p in self.staging.rglob("*") if p.is_file() and name in str(p)]
        return stored + staged


@pytest.fixture(params=["local", "s3"])
def stack(
    request: pytest.FixtureRequest,
    pg_url: str,
    logs: Path,
    tmp_path: Path,
    tiny_model_dir: Path,
    quant_cache: Path,
) -> Iterator[Stack]:
    # A private broker: no other test run's worker takes these messages.
    redis = RedisServer(logs)
    common: dict[str, Any] = {
        "database_url": pg_url,
        "broker_url": redis.url,
        # Photos stay while the job lives, so only the deletion removes them.
        "photo_retention_s": 3600,
        # No lease runs out here (every job ends by a DELETE or a purge), even on a machine
        # so loaded that a heartbeat is late by seconds.
        "heartbeat_s": 1,
        "stale_after_s": 60,
        "sweep_every_s": 0.5,
        "requeue_after_s": 2,
        "min_image_side": 32,
        # A copy is kept for an hour unless its job is gone: only the deletion removes it.
        "collect_after_s": 3600,
    }
    worker_dir = api_dir = tmp_path / "data"
    if request.param == "s3":
        common.update(request.getfixturevalue("s3_server").settings())
        worker_dir = tmp_path / "worker"  # no shared filesystem: staging lives under it
    api_env = service_env(data_dir=api_dir, **common)
    worker_env = service_env(
        data_dir=worker_dir,
        model=tiny_model_dir,
        quant_cache_dir=quant_cache,
        torch_threads=1,
        **common,
    )
    settings = Settings(**{**common, "data_dir": api_dir})
    staging = (
        Settings(**{**common, "data_dir": worker_dir}).resolved_staging_dir
        if request.param == "s3"
        else None
    )
    port = free_port()
    api = start_api(api_env, logs, port)
    stack = Stack(
        api_env=api_env,
        worker_env=worker_env,
        storage=storage_from_settings(settings),
        staging=staging,
        logs=logs,
        api=api,
        worker=start_worker(worker_env, logs, "w0"),
        client=httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30),
    )
    try:
        wait_for("the API", lambda: answers_ready(stack.client), 60, [api])
        yield stack
    finally:
        stack.client.close()
        for proc in (api, stack.worker):
            proc.terminate()
        for proc in (api, stack.worker):
            proc.stop()
        redis.stop()


def _tenant(stack: Stack, name: str) -> tuple[str, str]:
    """A new API key and its tenant's id (the CLI prints "name (id)")."""
    made = create_key(stack.api_env, name)
    return made["api key"], made["tenant"].split("(")[-1].rstrip(")")


def test_deleted_and_purged_fine_tunes_leave_no_file(stack: Stack) -> None:
    """Four fine-tunes train in one worker's co-training group (the default path); each ends
    by one of the four ways, and none leaves a file."""
    began = time.monotonic()
    key, tenant = _tenant(stack, "acme")
    other, purged_tenant = _tenant(stack, "globex")
    deleted, purged, then_killed, killed_first = (
        stack.submit(key, 1),
        stack.submit(other, 2),
        stack.submit(key, 3),
        stack.submit(key, 4),
    )
    jobs = {deleted: (key, tenant), purged: (other, purged_tenant)}
    jobs |= {then_killed: (key, tenant), killed_first: (key, tenant)}
    stack.training(jobs)
    auth = {"Authorization": f"Bearer {key}"}
    seen: dict[str, list[str]] = {}

    # DELETE mid-training: the worker goes on to its next step and finds the lease gone.
    assert stack.client.delete(f"/v1/finetunes/{deleted}", headers=auth).status_code == 204
    stack.one_step_later(key, then_killed)
    seen["DELETE mid-training"] = stack.left(tenant, deleted)

    # Purge mid-training: the tenant and everything of it goes.
    admin(stack.api_env, "tenants", "purge", "globex", "--yes")
    stack.one_step_later(key, then_killed)
    seen["purge mid-training"] = stack.left(purged_tenant, purged)

    # DELETE, then SIGKILL before the worker could clean up; SIGKILL, then DELETE. The next
    # worker's first sweep (at its start) removes the dead one's local copies.
    assert stack.client.delete(f"/v1/finetunes/{then_killed}", headers=auth).status_code == 204
    stack.kill_worker()
    assert stack.client.delete(f"/v1/finetunes/{killed_first}", headers=auth).status_code == 204
    stack.start_worker()
    wait_for("the new worker", lambda: " ready." in stack.worker.log(), 120, [stack.worker])
    seen["DELETE then SIGKILL"] = _eventually(lambda: stack.left(tenant, then_killed))
    seen["SIGKILL then DELETE"] = _eventually(lambda: stack.left(tenant, killed_first))

    print(json.dumps(seen, indent=1), f"{time.monotonic() - began:.0f} s")
    assert seen == {case: [] for case in seen}, seen


def _eventually(left: Any, timeout: float = 10) -> list[str]:
    """What is left once the new worker's first sweeps ran (at its start, then every
    TUNEQDM_SWEEP_EVERY_S): empty at once when they remove it, else what stays."""
    deadline = time.monotonic() + timeout
    found: list[str] = left()
    while found and time.monotonic() < deadline:
        time.sleep(0.5)
        found = left()
    return found
