"""Leases: one holder at a time, takeover after a stale heartbeat, the sweep requeues once;
attempts counted and capped, fair claims, the reconciler, the watchdog, the file collector."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from app.db import sql_now
from app.models import Adapter, FinetuneJob, Tenant, utcnow
from app.services import keys
from tests.worker.conftest import submit_finetune
from worker.context import Context
from worker.files import adapter_attempt_key, checkpoint_key, collect_orphans
from worker.finetunes import run_finetune
from worker.jobs import (
    JobModel,
    Lease,
    claim,
    claim_next,
    reconcile_queued,
    release_owned,
    sweep_stale,
    write_owned,
)


def _age_heartbeat(sessions: sessionmaker[Session], job_id: str, seconds: float) -> None:
    with sessions() as session:
        session.execute(
            update(FinetuneJob)
            .where(FinetuneJob.id == job_id)
            .values(heartbeat_at=utcnow() - timedelta(seconds=seconds))
        )
        session.commit()


def test_claim_is_exclusive_until_the_heartbeat_is_stale(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        assert not claim(s, FinetuneJob, job_id, "b", stale_after_s=30)
        assert write_owned(s, FinetuneJob, job_id, "a", progress_step=1)
    _age_heartbeat(ctx.sessions, job_id, 60)
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "b", stale_after_s=30)
        # The old holder learns at its next write that it lost the job.
        assert not write_owned(s, FinetuneJob, job_id, "a", progress_step=2)
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.lease_owner == "b" and job.progress_step == 1


def test_lease_heartbeat_and_loss(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
    with Lease(ctx.sessions, FinetuneJob, job_id, "a", heartbeat_s=0.05) as lease:
        assert lease.write(progress_step=1)
        with ctx.sessions() as s:  # the API's cancel
            s.execute(update(FinetuneJob).values(status="canceled"))
            s.commit()
        lease.lost.wait(5)
        assert lease.should_stop()


def test_sweep_requeues_a_dead_workers_job_once(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "dead", stale_after_s=30)
    sent: list[str] = []

    def enqueue(model: JobModel, object_id: str) -> None:
        sent.append(object_id)

    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == []
    _age_heartbeat(ctx.sessions, job_id, 60)
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == [job_id]
    assert sweep_stale(ctx.sessions, stale_after_s=30, enqueue=enqueue) == []
    assert sent == [job_id]
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "queued" and job.lease_owner is None


def test_claims_count_attempts_and_the_cap_fails_the_job_with_its_cause(
    ctx: Context, tenant: Tenant
) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    for attempt in range(1, ctx.settings.max_attempts + 1):
        with ctx.sessions() as s:
            assert claim(s, FinetuneJob, job_id, f"w{attempt}", stale_after_s=30) == attempt
        _age_heartbeat(ctx.sessions, job_id, 60)  # each worker died mid-run
    assert run_finetune(job_id, ctx) == "skipped (failed)"
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "failed" and job.lease_owner is not None
        assert job.error is not None and "the worker stopped 3 times" in job.error
    assert ctx.notify == [job_id]


def test_a_released_job_names_the_last_cause_when_its_attempts_run_out(
    ctx: Context, tenant: Tenant
) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    for _ in range(ctx.settings.max_attempts):
        with ctx.sessions() as s:
            assert claim(s, FinetuneJob, job_id, "w", stale_after_s=30)
        assert release_owned(ctx.sessions, FinetuneJob, job_id, "w", reason="disk full")
    # A stopped worker's release does not count: the job still has its last attempt left.
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "w", stale_after_s=30) == 4
    assert release_owned(ctx.sessions, FinetuneJob, job_id, "w", reason=None, counts=False)
    assert run_finetune(job_id, ctx) == "skipped (failed)"
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "failed"
        assert job.error == "gave up after 3 attempts; the last one ended with: disk full"


def test_tokens_claim_the_fairest_job_across_tenants(ctx: Context, tenant: Tenant) -> None:
    flood = [submit_finetune(ctx, tenant, '{"steps": 2}') for _ in range(5)]
    with ctx.sessions() as s:
        other = keys.get_or_create_tenant(session=s, name="other")
        s.commit()
    # The flooding tenant's first job runs; its other four wait.
    with ctx.sessions() as s:
        assert claim_next(s, FinetuneJob, "w1", stale_after_s=30, hint=flood[0]) == (flood[0], 1)
    late = submit_finetune(ctx, other, '{"steps": 2}')
    with ctx.sessions() as s:
        # The message names the flood's next job, the token goes to the other tenant's first.
        assert claim_next(s, FinetuneJob, "w2", stale_after_s=30, hint=flood[1]) == (late, 1)
        # Both tenants have one running job now: the one that started least recently is next.
        assert claim_next(s, FinetuneJob, "w3", stale_after_s=30, hint=late) == (flood[1], 1)
    finish = {"status": "succeeded", "lease_owner": None}
    with ctx.sessions() as s:
        s.execute(update(FinetuneJob).values(**finish))
        s.commit()
        # Nothing queued: the message's own job is done, the token finds nothing to claim.
        assert claim_next(s, FinetuneJob, "w4", stale_after_s=30, hint=late) is None


def test_reconciler_sends_messages_only_for_the_gap(ctx: Context, tenant: Tenant) -> None:
    jobs = [submit_finetune(ctx, tenant, '{"steps": 2}') for _ in range(3)]
    sent: list[str] = []

    def enqueue(model: JobModel, object_id: str) -> None:
        sent.append(object_id)

    def run(waiting: int, older_than_s: float = 0.0) -> list[str]:
        return reconcile_queued(
            ctx.sessions,
            older_than_s=older_than_s,
            backlog=lambda model: waiting if model is FinetuneJob else 0,
            enqueue=enqueue,
        )

    assert run(waiting=0, older_than_s=3600) == []  # too young: their messages may be on the way
    assert run(waiting=3) == []
    assert run(waiting=1) == jobs[:2]  # two messages lost: the oldest jobs get them
    assert sent == jobs[:2]


def test_watchdog_gives_a_job_without_progress_back(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
    stalled: list[str] = []
    with Lease(
        ctx.sessions,
        FinetuneJob,
        job_id,
        "a",
        heartbeat_s=0.05,
        progress_timeout_s=0.5,
        on_stall=lambda model, object_id: stalled.append(object_id),
    ) as lease:
        for _ in range(5):  # progress keeps the lease
            time.sleep(0.1)
            lease.touch()
        assert not lease.should_stop()
        assert lease.stalled.wait(5)
    assert stalled == [job_id] and lease.should_stop()
    with ctx.sessions() as s:
        job = s.get(FinetuneJob, job_id)
        assert job is not None and job.status == "queued" and job.attempts == 1
        assert job.error is not None and "no progress" in job.error


def test_heartbeats_use_the_database_clock(ctx: Context, tenant: Tenant) -> None:
    job_id = submit_finetune(ctx, tenant, '{"steps": 2}')
    with ctx.sessions() as s:
        assert claim(s, FinetuneJob, job_id, "a", stale_after_s=30)
        job = s.get(FinetuneJob, job_id)
        db_time = s.scalar(select(sql_now(s)))
    assert job is not None and job.heartbeat_at is not None and job.started_at is not None
    # Written by SQL, read back as aware UTC datetimes like every other column.
    assert job.heartbeat_at.tzinfo is not None
    assert abs((job.heartbeat_at - utcnow()).total_seconds()) < 5
    assert db_time is not None


def test_collector_removes_only_files_no_row_owns(ctx: Context, tenant: Tenant) -> None:
    done = submit_finetune(ctx, tenant, '{"steps": 2, "resolution": 64}')
    assert run_finetune(done, ctx) == "succeeded"
    queued = submit_finetune(ctx, tenant, '{"steps": 2}')
    storage = ctx.storage
    with ctx.sessions() as s:
        adapter = s.scalars(select(Adapter)).one()
    owned = storage.path(adapter.storage_key)
    lost_race = storage.path(adapter_attempt_key(tenant.id, adapter.id, 7))
    dead_checkpoint = storage.path(checkpoint_key(tenant.id, done)) / "checkpoint.pt"
    live_checkpoint = storage.path(checkpoint_key(tenant.id, queued)) / "checkpoint.pt"
    never_committed = storage.path(f"tenants/{tenant.id}/finetunes/ft_gone/inputs/000.png")
    interrupted = owned.parent / ".tmp-killed-mid-write"  # a write whose process died
    for path in (lost_race, dead_checkpoint, live_checkpoint, never_committed, interrupted):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert collect_orphans(ctx.sessions, storage, older_than_s=3600) == []  # all young
    removed = collect_orphans(ctx.sessions, storage, older_than_s=0)
    as_keys = {
        p.relative_to(storage.root).as_posix()
        for p in (lost_race, dead_checkpoint.parent, interrupted)
    }
    assert set(removed) == as_keys | {f"tenants/{tenant.id}/finetunes/ft_gone"}
    assert not never_committed.parents[1].exists()
    assert owned.is_file() and live_checkpoint.is_file()
    with ctx.sessions() as s:
        inputs = [img.storage_key for img in s.get(FinetuneJob, done).images]  # type: ignore[union-attr]
    assert all(storage.exists(key) for key in inputs)
