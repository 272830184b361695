"""The worker on S3 storage, in-process: two workers with staging folders of their own (no
shared filesystem) pass a fine-tune from one to the other through its uploaded checkpoint;
the adapter is exported; the orphan collector works from the store's listing; an unreachable
store is a fault the job is retried after."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from app import storage as st
from app.models import Adapter, FinetuneJob, Tenant
from app.s3_storage import S3Storage
from tests.s3server import S3Server
from tests.service.procs import TcpProxy
from tests.worker.conftest import Notified, submit_finetune, worker_settings
from tests.worker.test_exports import _ask, _row
from worker.context import Context
from worker.exports import run_export
from worker.files import adapter_attempt_key, checkpoint_key, collect_orphans
from worker.finetunes import run_finetune
from worker.jobs import SHUTDOWN
from worker.runtime import Runtime
from worker.staging import CHECKPOINT_FILE, Staging


@pytest.fixture
def s3(s3_server: S3Server) -> Iterator[S3Storage]:
    storage = S3Storage(
        bucket=s3_server.bucket,
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
        region=s3_server.region,
    )
    yield storage
    storage.delete_prefix("tenants")


def _worker(
    tmp_path: Path,
    name: str,
    sessions: sessionmaker[Session],
    storage: S3Storage,
    runtime: Runtime,
    tiny_model_dir: Path,
    quant_cache: Path,
) -> Context[S3Storage]:
    settings = worker_settings(
        tmp_path / name,
        tiny_model_dir,
        quant_cache,
        database_url=f"sqlite:///{tmp_path / 'registry.sqlite'}",
        # The solo path, which trains the step it is at before it pauses (a co-training group
        # asked to stop before its first step pauses with nothing to save).
        cotrain_max=1,
    )
    return Context(
        settings=settings, sessions=sessions, storage=storage, runtime=runtime, notify=Notified()
    )


def _local_files(ctx: Context[S3Storage]) -> list[Path]:
    return [p for p in ctx.files.root.rglob("*") if p.is_file()]


def test_a_fine_tune_moves_between_workers_through_the_store(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    s3: S3Storage,
    shared_runtime: Runtime,
    tiny_model_dir: Path,
    quant_cache: Path,
    tenant: Tenant,
) -> None:
    one, two = (
        _worker(tmp_path, n, sessions, s3, shared_runtime, tiny_model_dir, quant_cache)
        for n in ("one", "two")
    )
    assert one.files.root != two.files.root
    shared_runtime.settings = one.settings
    job_id = submit_finetune(one, tenant, '{"steps": 4, "resolution": 32, "checkpoint_every": 100}')
    # Worker one is asked to stop: it saves the step it is at, uploads it, gives the job back.
    SHUTDOWN.set()
    try:
        assert run_finetune(job_id, one) == "released"
    finally:
        SHUTDOWN.clear()
    checkpoint = f"{checkpoint_key(tenant.id, job_id)}/{CHECKPOINT_FILE}"
    assert s3.exists(checkpoint)
    assert _local_files(one) == []  # photos and checkpoint copies gone from its disk

    assert run_finetune(job_id, two) == "succeeded"
    with sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "succeeded", job and job.error
        assert job.resumed_from_step == 1
        adapter = s.scalars(select(Adapter)).one()
    assert not s3.exists(checkpoint)
    assert s3.size(adapter.storage_key) == adapter.size_bytes
    assert _local_files(two) == []

    # The adapter, fetched by the worker from the store, exported back into it.
    export_id = _ask(two, tenant, adapter.id, format="lora", rank=4)
    assert run_export(export_id, two) == "succeeded"
    row = _row(two, export_id)
    assert row.storage_key is not None and s3.size(row.storage_key) == row.size_bytes
    assert _local_files(two) == []

    # Orphans, found by listing the bucket: a lost race's adapter file and the photos of an
    # upload that never committed; the owned adapter and the kept photos stay.
    lost_race = adapter_attempt_key(tenant.id, adapter.id, 7)
    never_committed = f"tenants/{tenant.id}/finetunes/ft_gone/inputs/000.jpg"
    for key in (lost_race, never_committed):
        s3.put(key, b"x")
    assert collect_orphans(sessions, s3, older_than_s=3600) == []  # all young
    removed = collect_orphans(sessions, s3, older_than_s=0)
    assert set(removed) == {lost_race, f"tenants/{tenant.id}/finetunes/ft_gone"}
    assert s3.exists(adapter.storage_key) and not s3.exists(never_committed)


def test_an_unreachable_store_gives_the_job_back_and_it_succeeds_later(
    tmp_path: Path,
    sessions: sessionmaker[Session],
    s3: S3Storage,
    s3_server: S3Server,
    shared_runtime: Runtime,
    tiny_model_dir: Path,
    quant_cache: Path,
    tenant: Tenant,
) -> None:
    """The store cut off (every connection closed, as a partition looks) while a worker
    fetches a job's photos: the attempt is a service fault, the job goes back to the queue with
    that cause; once the store is back the next attempt succeeds and leaves no local copy."""
    port = int(s3_server.endpoint_url.rsplit(":", 1)[1])
    proxy = TcpProxy(port)
    try:
        cut = S3Storage(
            bucket=s3_server.bucket,
            endpoint_url=f"http://127.0.0.1:{proxy.port}",
            access_key_id=s3_server.access_key_id,
            secret_access_key=s3_server.secret_access_key,
            region=s3_server.region,
        )
        ctx = _worker(tmp_path, "w", sessions, cut, shared_runtime, tiny_model_dir, quant_cache)
        shared_runtime.settings = ctx.settings
        job_id = submit_finetune(ctx, tenant, '{"steps": 2, "resolution": 32}')
        proxy.off()
        assert run_finetune(job_id, ctx) == "released"
        with sessions() as s:
            job = s.get(FinetuneJob, job_id)
            assert job is not None and job.status == "queued"
            assert job.error == "the worker could not reach the object storage; retrying"
        proxy.on()
        assert run_finetune(job_id, ctx) == "succeeded"
        assert _local_files(ctx) == []
    finally:
        proxy.close()


def test_the_staging_sweep_removes_only_old_copies(tmp_path: Path, s3: S3Storage) -> None:
    staging = Staging(s3, tmp_path / "staging")
    old = staging.output("tenants/t_1/finetunes/ft_1/inputs/000.jpg")
    young = staging.output("tenants/t_1/finetunes/ft_2/inputs/000.jpg")
    for path in (old, young):
        path.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    assert staging.sweep(3600) == [old]
    assert young.is_file() and not old.parent.parent.exists()  # empty folders go too
    # The local backend's "copies" are the stored files themselves: never swept.
    local = st.LocalStorage(tmp_path / "files")
    local.put("tenants/t_1/adapters/ad_1_a1.safetensors", b"x")
    assert Staging(local, tmp_path / "unused").sweep(0) == []
