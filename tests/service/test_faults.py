"""Faults with real processes: Celery workers, PostgreSQL, Redis (docs/workers.md, "Faults").

Each test submits jobs through the API's own service functions, breaks something real (the
worker's database connection, the broker, the worker process, its clock, its disk) and then
checks that every job reached a final state with its files consistent (`Deployment.check`).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import resource
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app.db import make_engine, make_sessionmaker
from app.models import Adapter, FinetuneJob, GeneratedImage, GenerationJob, Tenant
from app.queue import CelerySender
from app.schemas import GenerationCreate
from app.services import keys
from app.services.finetunes import FinetuneForm, Upload, create_finetune
from app.services.generations import create_generation
from app.settings import Settings
from app.storage import LocalStorage
from tests.service.procs import (
    Proc,
    RedisServer,
    TcpProxy,
    service_env,
    start_worker,
    wait_for,
)
from tests.worker.conftest import photo_png
from worker.files import checkpoint_key

pytestmark = pytest.mark.slow  # make test-slow (docs/workers.md "Service tests")

FINAL = ("succeeded", "failed", "canceled")
# Short intervals so a fault heals within seconds (docs/settings.md explains each).
FAST: dict[str, object] = {
    "heartbeat_s": 0.5,
    "stale_after_s": 3,
    "sweep_every_s": 0.5,
    "requeue_after_s": 2,
    "db_retry_s": 0.5,
    "min_image_side": 32,
    "torch_threads": 1,
    "max_num_images": 64,
}


@dataclass
class Deployment:
    """One service's settings, database and files, seen from the test (the API's side)."""

    values: dict[str, object]
    logs: Path
    sessions: sessionmaker[Session]
    workers: list[Proc] = field(default_factory=list)
    finetunes: list[str] = field(default_factory=list)
    generations: list[str] = field(default_factory=list)

    @property
    def settings(self) -> Settings:
        return Settings(**self.values)  # type: ignore[arg-type]

    @property
    def storage(self) -> LocalStorage:
        return LocalStorage(self.settings.resolved_storage_dir)

    def env(self, **overrides: object) -> dict[str, str]:
        return service_env(**{**self.values, **overrides})

    def worker(
        self,
        name: str,
        prefix: list[str] | None = None,
        extra_env: dict[str, str] | None = None,
        **overrides: object,
    ) -> Proc:
        env = {**self.env(**overrides), **(extra_env or {})}
        proc = start_worker(env, self.logs, name, prefix or [])
        self.workers.append(proc)
        return proc

    def tenant(self, name: str) -> Tenant:
        with self.sessions() as s:
            tenant = keys.get_or_create_tenant(session=s, name=name)
            s.commit()
            return tenant

    def finetune(self, tenant: Tenant, **params: Any) -> str:
        params = {"steps": 6, "resolution": 32, "checkpoint_every": 2, "seed": 3, **params}
        settings = self.settings
        with self.sessions() as s:
            job = create_finetune(
                session=s,
                storage=self.storage,
                sender=CelerySender(settings.resolved_broker_url),
                settings=settings,
                tenant=s.merge(tenant),
                form=FinetuneForm(instance_prompt="a photo of sks dog", params=_json(params)),
                uploads=[Upload(f"{i}.png", io.BytesIO(photo_png(i))) for i in range(2)],
            )
        self.finetunes.append(job.id)
        return job.id

    def generation(self, tenant: Tenant, **fields: Any) -> str:
        data = {"prompt": "a dog", "steps": 3, "width": 32, "height": 32, "seed": 1, **fields}
        settings = self.settings
        with self.sessions() as s:
            gen = create_generation(
                session=s,
                sender=CelerySender(settings.resolved_broker_url),
                settings=settings,
                tenant=s.merge(tenant),
                data=GenerationCreate(**data),
            )
        self.generations.append(gen.id)
        return gen.id

    def row(self, model: Any, job_id: str) -> Any:
        with self.sessions() as s:
            row = s.get(model, job_id)
            assert row is not None
            return row

    def states(self) -> dict[str, str]:
        rows = [self.row(FinetuneJob, i) for i in self.finetunes]
        rows += [self.row(GenerationJob, i) for i in self.generations]
        return {r.id: r.status for r in rows}

    def wait_final(self, timeout: float = 240) -> dict[str, str]:
        procs = [w for w in self.workers if w.alive()]
        wait_for(
            "every job to reach a final state",
            lambda: all(s in FINAL for s in self.states().values()),
            timeout,
            procs,
        )
        return self.states()

    def check(self) -> None:
        """Every job final; files exactly those the rows name (no temporary files, no adapter
        or image without a row, no checkpoint of a finished job)."""
        storage = self.storage
        root = storage.root
        files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
        assert not [f for f in files if Path(f).name.startswith(".")], files
        with self.sessions() as s:
            adapters = {a.storage_key: a for a in s.scalars(select(Adapter))}
            images = set(s.scalars(select(GeneratedImage.storage_key)))
            for job_id in self.finetunes:
                job = s.get(FinetuneJob, job_id)
                assert job is not None and job.status in FINAL, job and job.status
                prefix = checkpoint_key(job.tenant_id, job.id) + "/"
                assert not [f for f in files if f.startswith(prefix)], job.id
                owned = [a for a in adapters.values() if a.finetune_job_id == job.id]
                assert len(owned) == (job.status == "succeeded"), (job.id, job.status)
            for gen_id in self.generations:
                gen = s.get(GenerationJob, gen_id)
                assert gen is not None and gen.status in FINAL
                assert len(gen.images) == (gen.num_images if gen.status == "succeeded" else 0)
        for key, adapter in adapters.items():
            assert storage.path(key).stat().st_size == adapter.size_bytes
        assert {f for f in files if "/adapters/" in f} == set(adapters)
        assert {f for f in files if "/generations/" in f} == images

    def stop(self) -> None:
        for proc in self.workers:
            proc.stop()


def _json(params: dict[str, Any]) -> str:
    import json

    return json.dumps(params)


@contextlib.contextmanager
def deployed(values: dict[str, object], logs: Path) -> Iterator[Deployment]:
    """A Deployment of `values` (tiny_settings and more), its processes stopped at the end."""
    engine = make_engine(str(values["database_url"]))
    deployment = Deployment(values=values, logs=logs, sessions=make_sessionmaker(engine))
    try:
        yield deployment
    finally:
        deployment.stop()
        engine.dispose()


@pytest.fixture
def deploy(logs: Path, tiny_settings: dict[str, object]) -> Iterator[Deployment]:
    with deployed({**tiny_settings, **FAST}, logs) as deployment:
        yield deployment


def _ready(proc: Proc) -> bool:
    return " ready." in proc.log()


def _wait_ready(proc: Proc) -> None:
    wait_for(f"{proc.name} to start", lambda: _ready(proc), 120, [proc])


def _wait_base_or_final(deploy: Deployment, proc: Proc) -> bool:
    """Whether `proc` loaded its base; False when every job ended before it needed to."""
    wait_for(
        f"{proc.name} to load its base or every job to end",
        lambda: "loaded in" in proc.log() or _all_final(deploy),
        240,
        [proc],
    )
    return "loaded in" in proc.log()


def _all_final(deploy: Deployment) -> bool:
    return all(s in FINAL for s in deploy.states().values())


def _wait_exit_or_final(deploy: Deployment, proc: Proc) -> None:
    def changed() -> bool:
        return not proc.alive() or _all_final(deploy)

    wait_for("the worker to exit or every job to end", changed, 240, [])


def test_database_cut_while_the_worker_takes_a_message(deploy: Deployment, pg_url: str) -> None:
    """The task cannot reach PostgreSQL: it retries (message kept) and runs once it can."""
    proxy = TcpProxy(int(re.search(r":(\d+)/", pg_url).group(1)))  # type: ignore[union-attr]
    try:
        through_proxy = re.sub(r":\d+/", f":{proxy.port}/", pg_url, count=1)
        worker = deploy.worker("worker", database_url=through_proxy)
        wait_for("the worker", lambda: _ready(worker), 120, [worker])
        proxy.off()
        tenant = deploy.tenant("acme")
        deploy.finetune(tenant)
        deploy.generation(tenant)
        wait_for("a retry", lambda: "database not reachable" in worker.log(), 60, [worker])
        proxy.on()
        states = deploy.wait_final()
    finally:
        proxy.close()
    assert set(states.values()) == {"succeeded"}, (states, worker.log()[-3000:])
    deploy.check()
    print(f"database cut: {states}")


def test_redis_restarted_with_jobs_queued(deploy: Deployment, logs: Path) -> None:
    """Every message is lost with the broker; the reconciler sends them again."""
    redis = RedisServer(logs)
    try:
        deploy.values["broker_url"] = redis.url
        a, b = deploy.tenant("acme"), deploy.tenant("globex")
        deploy.finetune(a)
        deploy.finetune(b)
        deploy.generation(b)
        redis.restart()
        worker = deploy.worker("worker")
        states = deploy.wait_final()
    finally:
        deploy.stop()
        redis.stop()
    assert set(states.values()) == {"succeeded"}, states
    assert "had no message; sent again" in worker.log()
    deploy.check()
    print(f"redis restarted: {states}")


def test_sigterm_checkpoints_and_the_next_worker_resumes_at_once(deploy: Deployment) -> None:
    """docker stop: the running fine-tune saves the step it is at and gives its job back; the
    next worker starts from that step without waiting for a lease to expire."""
    # No scheduled checkpoint, and leases and the reconciler far too slow to matter here.
    deploy.values.update(stale_after_s=600, requeue_after_s=600)
    tenant = deploy.tenant("acme")
    job_id = deploy.finetune(tenant, steps=24, checkpoint_every=1000)
    checkpoint = deploy.storage.path(checkpoint_key(tenant.id, job_id)) / "checkpoint.pt"
    first = deploy.worker("first")
    wait_for("progress", lambda: deploy.row(FinetuneJob, job_id).progress_step >= 3, 240, [first])
    first.popen.terminate()
    assert first.popen.wait(timeout=120) == 0, first.log()[-3000:]
    stopped = deploy.row(FinetuneJob, job_id)
    assert (stopped.status, stopped.lease_owner, stopped.attempts) == ("queued", None, 0)
    saved = int(torch.load(checkpoint, weights_only=True)["step"])
    assert saved >= 3
    second = deploy.worker("second")
    states = deploy.wait_final()
    job = deploy.row(FinetuneJob, job_id)
    assert states == {job_id: "succeeded"}, (job.error, second.log()[-3000:])
    assert (job.resumed_from_step, job.attempts) == (saved, 1)
    deploy.check()
    print(f"SIGTERM at step {saved}: resumed from {job.resumed_from_step}, {states}")


def _faketime(offset: str) -> dict[str, str]:
    """libfaketime preloaded into the worker itself (the `faketime` wrapper would be the
    process the test stops, leaving the worker running). The monotonic clock moves by the
    same offset, which changes no interval; keeping it real (FAKETIME_DONT_FAKE_MONOTONIC)
    makes Python's time.sleep fail with EINVAL under libfaketime 0.9.10."""
    libs = sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))
    if not libs:
        pytest.skip("libfaketime (Debian package faketime) is not installed")
    return {"LD_PRELOAD": str(libs[0]), "FAKETIME": offset}


def _log_clock(proc: Proc) -> datetime:
    # The worker's JSON log lines carry its own clock's UTC time.
    stamp = re.search(r'"time": "(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)', proc.log())
    assert stamp is not None, proc.log()
    return datetime.strptime(stamp.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=timezone.utc)


def test_workers_with_clocks_five_minutes_off_leave_each_others_jobs_alone(
    deploy: Deployment,
) -> None:
    """One worker 5 minutes fast, one 5 minutes slow, both sweeping every half second with a
    30 s lease: heartbeats and staleness use the database's clock, so neither takes the other's
    live job (with each host's clock, the fast one would see the slow one's heartbeats as 10
    minutes old)."""
    # Far below the clocks' 10 minutes apart, far above a loaded machine's pauses.
    deploy.values.update(stale_after_s=30)
    fast = deploy.worker("fast", extra_env=_faketime("+5m"))
    slow = deploy.worker("slow", extra_env=_faketime("-5m"))
    wait_for("both workers", lambda: _ready(fast) and _ready(slow), 120, [fast, slow])
    now = datetime.now(timezone.utc)
    assert (_log_clock(fast) - now).total_seconds() > 240  # faketime does reach Python
    assert (now - _log_clock(slow)).total_seconds() > 240
    a, b = deploy.tenant("acme"), deploy.tenant("globex")
    jobs = [deploy.finetune(a, steps=8), deploy.finetune(b, steps=8)]
    states = deploy.wait_final()
    assert set(states.values()) == {"succeeded"}, states
    # Each job ran once, whichever worker took it; the other worker swept it all along.
    runs = re.findall(r"fine-tune (ft_\w+) succeeded in", fast.log() + slow.log())
    assert sorted(runs) == sorted(jobs), runs
    for job_id in jobs:
        assert deploy.row(FinetuneJob, job_id).attempts == 1
    assert "stale heartbeat" not in fast.log() + slow.log()
    deploy.check()
    print(f"clocks +5/-5 min: {states}, attempts 1 each")


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root and CAP_SYS_ADMIN needed): {done.stderr}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_disk_while_checkpointing_releases_the_job_for_a_retry(
    deploy: Deployment, tmp_path: Path
) -> None:
    """A real full filesystem (a small tmpfs) under the job's checkpoint: the attempt gives
    the job back with the cause and leaves no partial file; with space again it succeeds."""
    with _tmpfs(tmp_path / "files", "4m") as files:
        deploy.values.update(storage_dir=files, max_attempts=1000)
        tenant = deploy.tenant("acme")
        job_id = deploy.finetune(tenant, steps=8, checkpoint_every=2)
        filler = files / "filler"
        # Fill what is left: the photos are stored, nothing more fits.
        with filler.open("wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * (8 << 20))
        worker = deploy.worker("worker")
        wait_for(
            "a release for a full disk",
            lambda: "disk was full" in (deploy.row(FinetuneJob, job_id).error or ""),
            240,
            [worker],
        )
        filler.unlink()
        states = deploy.wait_final()
        job = deploy.row(FinetuneJob, job_id)
        assert states == {job_id: "succeeded"}, (job.error, worker.log()[-3000:])
        assert job.attempts >= 2 and job.error is None
        deploy.check()
        deploy.stop()
    print(f"full disk: {states} after {job.attempts} attempts")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_poison_generation_fails_alone_and_others_still_succeed(deploy: Deployment) -> None:
    """A generation that kills its worker each time (the kernel ends the process when it
    passes its CPU-time limit, as an out-of-memory kill would): it drags the generations
    batched with it along once, then runs alone; after TUNEQDM_MAX_ATTEMPTS it fails with the
    cause and the others succeed."""
    deploy.values.update(max_attempts=2, generation_batch_size=8)
    a, b = deploy.tenant("acme"), deploy.tenant("globex")
    # 32 images × 30 steps take far more than the 5 s of CPU time the worker gets below, on
    # any machine (at 4 steps a fast, idle machine could finish them in time); one image of
    # the same loop shape takes about 1.5 s on 2 cores. Cost 960, within the budget of 1000.
    shape = {"steps": 30, "width": 32, "height": 32}
    poison = deploy.generation(a, num_images=32, **shape)
    others = [deploy.generation(b, **shape), deploy.generation(b, seed=2, **shape)]
    deaths: list[int] = []
    worker = None
    while not all(s in FINAL for s in deploy.states().values()):
        if worker is None or not worker.alive():
            if worker is not None:
                deaths.append(worker.stop())
            assert len(deaths) <= 4, deaths
            # A supervisor's restart, as docker's restart policy does.
            worker = deploy.worker(f"worker-{len(deaths)}")
            # The base loads with the first job that needs it; a worker left only with the
            # poison's message fails it at its claim (attempts spent) and never loads it.
            if _wait_base_or_final(deploy, worker):
                # CPU time for the small generations (about 1.5 s each here), not for 32
                # images (about 18 s). The limit counts from the process start, so setting
                # it once the first job runs is fine.
                budget = int(_cpu_seconds(worker.popen.pid)) + 5
                resource.prlimit(worker.popen.pid, resource.RLIMIT_CPU, (budget, budget + 30))
        _wait_exit_or_final(deploy, worker)
    states = deploy.states()
    assert deaths == [-signal.SIGXCPU] * 2, deaths
    assert states[poison] == "failed", states
    error = deploy.row(GenerationJob, poison).error
    assert error is not None and "the worker stopped 2 times" in error
    assert [states[g] for g in others] == ["succeeded", "succeeded"]
    # Dragged along once (the first batch), then each ran alone.
    assert [deploy.row(GenerationJob, g).attempts for g in others] == [2, 2]
    deploy.check()
    print(f"poison: {states}; worker exits {deaths}")


def test_a_job_without_progress_is_given_up_and_its_worker_restarts(deploy: Deployment) -> None:
    """The watchdog: a job that reports no progress for TUNEQDM_PROGRESS_TIMEOUT_S (here 2 s,
    less than loading the base takes) is given back with the cause, its worker exits with
    status 70 for its supervisor to restart it, and after TUNEQDM_MAX_ATTEMPTS the job fails
    naming the cause."""
    from worker.jobs import STALLED_EXIT

    deploy.values.update(progress_timeout_s=2, max_attempts=1)
    tenant = deploy.tenant("acme")
    job_id = deploy.finetune(tenant)
    first = deploy.worker("first")
    assert first.popen.wait(timeout=240) == STALLED_EXIT, first.log()[-3000:]
    given_up = deploy.row(FinetuneJob, job_id)
    assert (given_up.status, given_up.attempts) == ("queued", 1)
    assert "made no progress for 2 s" in given_up.error
    deploy.worker("second")
    states = deploy.wait_final()
    job = deploy.row(FinetuneJob, job_id)
    assert states == {job_id: "failed"}
    assert job.error.startswith("gave up after 1 attempts; the last one ended with: the job made")
    deploy.check()
    print(f"watchdog: worker exit {STALLED_EXIT}, then {states}: {job.error}")
